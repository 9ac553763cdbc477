"""virtplane.web"""
