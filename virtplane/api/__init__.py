"""virtplane.api"""
