"""virtplane.cli"""
