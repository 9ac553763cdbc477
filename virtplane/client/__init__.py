"""virtplane.client"""
