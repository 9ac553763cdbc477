"""virtplane.apiserver"""
