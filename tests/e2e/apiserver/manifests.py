"""KubeVirt-shaped manifests as users write them."""

VM_CIRROS = """\
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: {name}
  labels:
    app: demo
spec:
  runStrategy: Halted
  template:
    metadata:
      labels:
        kubevirt.io/vm: {name}
    spec:
      domain:
        devices:
          disks:
          - name: containerdisk
            disk:
              bus: virtio
          - name: cloudinitdisk
            disk:
              bus: virtio
          interfaces:
          - name: default
            masquerade: {{}}
        resources:
          requests:
            memory: 128Mi
      networks:
      - name: default
        pod: {{}}
      volumes:
      - name: containerdisk
        containerDisk:
          image: quay.io/kubevirt/cirros-container-disk-demo
      - name: cloudinitdisk
        cloudInitNoCloud:
          userData: |
            #!/bin/sh
            echo hello
"""
