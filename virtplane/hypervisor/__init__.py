"""virtplane.hypervisor"""
