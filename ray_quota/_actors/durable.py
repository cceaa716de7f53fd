"""Where the executor's state lives, and whether a start must find it there.

The default state file is per user and per environment (``<user state dir>/<environment>.sqlite``,
mode 0600 in a 0700 directory), so spent budgets outlive ``ray-quota stop``, :func:`shutdown` and
the Ray cluster itself. ``RAY_QUOTA_STATE_DIR`` moves the directory (tests point it at a
temporary one).

A *marker* in the Ray cluster's key-value store says that an executor of this cluster ran on a
state file and was not stopped on purpose. While it is there, a start of the executor is a Ray
restart (its process or node failed): the state file must hold that state, or the executor
refuses to start (:class:`StateMissingError`) instead of starting afresh with full budgets. A
deliberate stop (:func:`ray_quota.shutdown`) removes the marker; a new Ray cluster has none.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ray_quota._errors import StateMissingError

STATE_DIR_VARIABLE = "RAY_QUOTA_STATE_DIR"
_MARKER_PREFIX = "ray_quota/state:"
_MARKER_NAMESPACE = "ray_quota"
_LOCAL_MARKERS: dict[str, str] = {}  # outside Ray (tests of the actor class): this process's


def default_state_path(environment: str) -> str:
    """This user's state file for ``environment``, its directory created private (0700)."""
    configured = os.environ.get(STATE_DIR_VARIABLE)
    if configured:
        directory = Path(configured)
    else:
        import platformdirs  # here: only the executor's process needs it

        directory = Path(platformdirs.user_state_dir("ray_quota"))
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    return str(directory / f"{environment}.sqlite")


@dataclass(frozen=True, slots=True)
class Marker:
    """What an executor that was not stopped on purpose ran on."""

    cluster_id: str
    environment: str


class Markers:
    """The markers of one Ray cluster (or, outside Ray, of this process), keyed by state path."""

    def __init__(self) -> None:
        import ray

        self._ray = ray.is_initialized()

    def get(self, path: str) -> Marker | None:
        raw: str | bytes | None
        if self._ray:
            from ray.experimental.internal_kv import _internal_kv_get

            raw = _internal_kv_get(_MARKER_PREFIX + path, namespace=_MARKER_NAMESPACE)
        else:
            raw = _LOCAL_MARKERS.get(path)
        return None if raw is None else Marker(**json.loads(raw))

    def put(self, path: str, marker: Marker) -> None:
        raw = json.dumps(asdict(marker))
        if self._ray:
            from ray.experimental.internal_kv import _internal_kv_put

            _internal_kv_put(_MARKER_PREFIX + path, raw, namespace=_MARKER_NAMESPACE)
        else:
            _LOCAL_MARKERS[path] = raw

    def clear(self, path: str) -> None:
        """Forget the marker of ``path`` (tests of a deliberate stop outside Ray)."""
        if self._ray:
            from ray.experimental.internal_kv import _internal_kv_del

            _internal_kv_del(_MARKER_PREFIX + path, namespace=_MARKER_NAMESPACE)
        else:
            _LOCAL_MARKERS.pop(path, None)


def clear_markers() -> None:
    """A deliberate stop: the next start of an executor in this cluster may start afresh."""
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_list

    for key in _internal_kv_list(_MARKER_PREFIX, namespace=_MARKER_NAMESPACE):
        _internal_kv_del(key, namespace=_MARKER_NAMESPACE)


def check_expected(path: str, marker: Marker | None, found: str | None) -> None:
    """Refuse a restart that does not find the state it ran on (``found``: the cluster id in
    the file, or None for no state)."""
    if marker is None or found == marker.cluster_id:
        return
    what = "no saved state" if found is None else f"the state of another executor ({found})"
    raise StateMissingError(
        f"the executor of environment {marker.environment!r} (cluster id {marker.cluster_id}) "
        f"was restarted by Ray but found {what} in {path}. Starting afresh would refill every "
        "spent budget, so it refuses: Ray may have restarted it on a node without its state "
        "file (keep it on the node that holds the file, or give a state_path on storage every "
        "node sees). To start afresh knowingly, ray_quota.shutdown() (`ray-quota stop`) first.")
