"""virtplane.node"""
