"""virtplane.controllers"""
