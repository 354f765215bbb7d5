"""What this machine's accelerator is and what runs on it: CUDA probing and the
registry of resident (persistent) kernels. A leaf: it imports nothing of the package
but ``errors``, so ``memory`` and ``backends`` both build on it."""
