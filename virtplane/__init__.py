"""virtplane: a KubeVirt-compatible virtualization platform."""

__version__ = "0.1.0"
