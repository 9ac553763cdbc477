"""virtplane.network"""
