"""The graph-safe operators of sonar_kernels: every public op registered with `torch.library` (namespace
`sonar_kernels::`), each with a fake (meta) implementation and registered autograd, so the ops run inside
`torch.compile(fullgraph=True)` regions without graph breaks and pass `torch.library.opcheck`.

One file per op: host code (backend choice happens in the functional wrapper; the op runs the chosen
backend's kernels, the Triton launchers, the native library or plain PyTorch) + autograd. Input checks that
would need the data on the host (target ranges, cu_seqlens values) run inside the op, where a compiled graph
never sees them. The functional wrappers in `sonar_kernels.functional` are the public entry points.
"""
