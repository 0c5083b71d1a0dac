"""The cache claim the operator creates itself (docs/cache.md, "A StorageClass instead of a claim").

With `--cache-storage-class`, the shared cache's PersistentVolumeClaim (`--cache-claim`, default `kubetune-cache`)
is created in a job's namespace the first time a job there needs it: ReadWriteMany, of the configured size and
StorageClass, labelled as kubetune's, owned by no FineTuneJob (the cache outlives every job) and never deleted by
the operator. Pure functions: the claim's manifest and what a claim that is not bound means for the waiting
preflight; which namespaces already have it (`KnownClaims`); the controller creates the claim and reads it
(kubetune.children).
"""

from __future__ import annotations

from typing import Any, Callable

from kubetune.builders import COMPONENT_LABEL, MANAGED_BY, BuildConfig

DEFAULT_CLAIM = "kubetune-cache"
COMPONENT = "model-cache"


def cache_claim_labels() -> dict[str, str]:
    """Labels of the claim: kubetune's, the cache component, and no job (it belongs to the namespace's jobs)."""
    return {**MANAGED_BY, COMPONENT_LABEL: COMPONENT}


def build_cache_claim(namespace: str, cfg: BuildConfig) -> dict[str, Any]:
    """core/v1 PersistentVolumeClaim `cfg.cache_claim` in `namespace`, of StorageClass `cfg.cache_storage_class`:
    no owner reference, so deleting a FineTuneJob (or all of them) leaves the cache in place."""
    if not cfg.cache_claim or not cfg.cache_storage_class:
        raise ValueError("the cache claim is created only with a cache claim name and a StorageClass")
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": cfg.cache_claim, "namespace": namespace, "labels": cache_claim_labels()},
        "spec": {"accessModes": list(cfg.cache_access_modes),
                 "storageClassName": cfg.cache_storage_class,
                 "resources": {"requests": {"storage": f"{cfg.cache_size_gib}Gi"}}},
    }


def claim_not_ready_message(claim: dict[str, Any] | None, cfg: BuildConfig) -> str:
    """Why the preflight pod waits on the cache claim, or '' when the claim is bound (then the wait is elsewhere).

    `claim` is the claim as read (None: it does not exist)."""
    name = cfg.cache_claim
    if claim is None:
        if cfg.cache_storage_class:
            return (f"the cache claim {name!r} does not exist yet: the operator creates it (StorageClass "
                    f"{cfg.cache_storage_class})")
        return (f"the cache claim {name!r} does not exist in this namespace: create it (ReadWriteMany) or set "
                f"trainer.cache.storageClass so that the operator creates it (docs/cache.md)")
    phase = (claim.get("status") or {}).get("phase") or "Pending"
    if phase == "Bound":
        return ""
    spec = claim.get("spec") or {}
    storage_class = spec.get("storageClassName")
    size = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "?")
    modes = ", ".join(spec.get("accessModes") or []) or "?"
    if phase == "Pending":
        return (f"the cache claim {name!r} is Pending: no PersistentVolume is bound to it (StorageClass "
                f"{storage_class or '(default)'}, {size}, {modes}); a provisioner for that StorageClass, or an "
                f"available PersistentVolume of it, is needed before the preflight can start")
    return f"the cache claim {name!r} is {phase}: its PersistentVolume is gone; recreate the claim"


class KnownClaims:
    """The namespaces where this operator process has seen or created its managed cache claim, so the claim is
    checked once per namespace rather than with a GET before every Job it applies. A claim deleted later is
    noticed when a preflight pod waits on it: `forget` the namespace, then `ensure` creates it again."""

    def __init__(self, ensure: Callable[[str], None]) -> None:
        self._ensure = ensure
        self._known: set[str] = set()

    def ensure(self, namespace: str) -> None:
        """Make sure the claim exists in `namespace` (asks the cluster only the first time)."""
        if namespace in self._known:
            return
        self._ensure(namespace)
        self._known.add(namespace)

    def forget(self, namespace: str) -> None:
        """The claim was found missing in `namespace`: the next `ensure` asks the cluster again."""
        self._known.discard(namespace)
