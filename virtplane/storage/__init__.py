"""virtplane.storage"""
