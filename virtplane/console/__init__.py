"""virtplane.console"""
