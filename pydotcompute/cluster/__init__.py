"""Placement of kernels on a Ray cluster: Ray is where a kernel runs, not how.

A runtime made with ``cluster=`` hands each kernel to ``RayKernelBackend``, which
starts a ``KernelActor`` on a node of the cluster; the actor runs the kernel's own
backend (host, cpu, cuda, from ``backends.registry``) and moves batches.
``KernelPlacement`` (a leaf) says where a kernel landed.
"""
