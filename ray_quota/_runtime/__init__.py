"""The worker side's Ray code: who this process is, calls to the executor, where lease calls go,
and the threads that renew this process's leases.

Layers, each importing only those above it:

- :mod:`~ray_quota._runtime.identity`: this process's holder id, lease keys, claimant, role.
- :mod:`~ray_quota._runtime.steps`: waiting logic written once, driven sync or async.
- :mod:`~ray_quota._runtime.rpc`: the executor's handle and the one retrying call path, where
  Ray's errors become ours.
- :mod:`~ray_quota._runtime.routing`: a lease call goes to the node's broker or the executor;
  the broker's failure hands its leases to the executor.
- :mod:`~ray_quota._runtime.renewer`: the renewer and recall-watch threads, and flushing at exit.
"""
