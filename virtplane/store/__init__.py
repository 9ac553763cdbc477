"""virtplane.store"""
