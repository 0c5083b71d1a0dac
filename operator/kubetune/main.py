"""`kubetune operator`: run the FineTuneJob operator (kopf) with leader election, health and metrics."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

import kopf

from kubetune import API_GROUP, __version__
from kubetune.builders import BuildConfig
from kubetune.cache_claim import DEFAULT_CLAIM
from kubetune.estimate import parse_pricing
from kubetune.handlers import OperatorConfig, Reconciler, registry
from kubetune.leader import LeaseElector, default_identity
from kubetune.memory_trace import MemoryTrace
from kubetune.metrics import OperatorMetrics

log = logging.getLogger("kubetune.operator")


# Reconcile passes are blocking client calls run by this many worker threads (kubetune.controller), over as
# many pooled connections. A new job's pass is ~4 sequential requests, each waiting on a busy apiserver far
# longer than it uses the operator's CPU. (24 threads measured no faster than 12 at 1,000 jobs: the busy
# apiserver is the bound, see bench/README.md.)
RECONCILE_THREADS = 12


def build_parser() -> argparse.ArgumentParser:
    """The operator's command-line flags (each also readable from a KUBETUNE_* env var)."""
    env = os.environ.get
    p = argparse.ArgumentParser(prog="kubetune operator", description=__doc__)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[],
                       help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch all namespaces (default)")
    p.add_argument("--liveness-port", type=int, default=int(env("KUBETUNE_LIVENESS_PORT", "8080")),
                   help="port of kopf's /healthz endpoint (0 = off)")
    p.add_argument("--metrics-port", type=int, default=int(env("KUBETUNE_METRICS_PORT_OPERATOR", "8000")),
                   help="port of the Prometheus /metrics endpoint (0 = off)")
    p.add_argument("--leader-election", dest="leader_election", action=argparse.BooleanOptionalAction,
                   default=env("KUBETUNE_LEADER_ELECTION", "true").lower() != "false",
                   help="hold a coordination.k8s.io Lease so only one replica acts (default on)")
    p.add_argument("--lease-name", default=env("KUBETUNE_LEASE_NAME", "kubetune-operator"))
    p.add_argument("--lease-namespace", default=env("KUBETUNE_LEASE_NAMESPACE") or env("POD_NAMESPACE"),
                   help="namespace of the Lease (default: $POD_NAMESPACE, else the first --namespace, else default)")
    p.add_argument("--lease-seconds", type=int, default=int(env("KUBETUNE_LEASE_SECONDS", "15")),
                   help="Lease duration: a standby takes over this long after the leader stops renewing")
    p.add_argument("--resync-seconds", type=float, default=float(env("KUBETUNE_RESYNC_SECONDS", "60")),
                   help="period of the safety-net resync of active jobs (sizing retries, TTLs and progress "
                        "have their own timing)")
    p.add_argument("--progress-seconds", type=float, default=float(env("KUBETUNE_PROGRESS_SECONDS", "10")),
                   help="how often a running job's rank-0 /progress is read (off the reconcile path)")
    p.add_argument("--workers", type=int, default=int(env("KUBETUNE_WORKERS", str(RECONCILE_THREADS))),
                   help="reconcile worker threads (passes run in parallel, one at a time per FineTuneJob)")
    p.add_argument("--sizing-retry-seconds", type=float,
                   default=float(env("KUBETUNE_SIZING_RETRY_SECONDS", "60")),
                   help="retry delay while no GPU layout fits")
    p.add_argument("--occupancy", action=argparse.BooleanOptionalAction,
                   default=env("KUBETUNE_OCCUPANCY", "true").lower() not in ("0", "false", "no"),
                   help="size with the GPUs free now (watches unfinished pods of all namespaces); "
                        "--no-occupancy sizes on allocatable GPUs only")
    p.add_argument("--resize-unschedulable-seconds", type=float,
                   default=float(env("KUBETUNE_RESIZE_UNSCHEDULABLE_SECONDS", "300")),
                   help="size a job again, avoiding its GPU type, when its trainer pods stayed unschedulable "
                        "this long (0: never)")
    p.add_argument("--preflight", action=argparse.BooleanOptionalAction,
                   default=env("KUBETUNE_PREFLIGHT", "true").lower() not in ("0", "false", "no"),
                   help="check each job's model and data in a CPU Job <job>-preflight before its trainer Job "
                        "(spec.preflight.enabled overrides per job); --no-preflight creates the trainer Job at once")
    p.add_argument("--cache-claim", default=env("KUBETUNE_CACHE_CLAIM", ""),
                   help="an existing ReadWriteMany PersistentVolumeClaim (in each job's namespace) holding the shared "
                        "model and dataset cache: the preflight fills it, trainer pods mount it read-only; "
                        "with --cache-storage-class, the claim the operator creates (default kubetune-cache); "
                        "empty: no cache, every trainer pod downloads the model (docs/cache.md)")
    p.add_argument("--cache-storage-class", default=env("KUBETUNE_CACHE_STORAGE_CLASS", ""),
                   help="create the cache claim (--cache-claim, default kubetune-cache) in a job's namespace when it "
                        "is missing, of this StorageClass; the operator never deletes it (docs/cache.md)")
    p.add_argument("--cache-size-gib", type=int,
                   default=int(env("KUBETUNE_CACHE_SIZE_GIB", str(BuildConfig.cache_size_gib))),
                   help="size of the cache claim the operator creates (with --cache-storage-class)")
    p.add_argument("--cache-access-modes",
                   default=env("KUBETUNE_CACHE_ACCESS_MODES", ",".join(BuildConfig.cache_access_modes)),
                   help="access modes of the cache claim the operator creates, comma-separated")
    p.add_argument("--cache-mount-path", default=env("KUBETUNE_CACHE_MOUNT_PATH", BuildConfig.cache_mount_path),
                   help="where pods mount the cache claim")
    p.add_argument("--cache-max-gib", type=float, default=float(env("KUBETUNE_CACHE_MAX_GIB", "0")),
                   help="size cap of the cache: the preflight evicts least recently used entries no running job "
                        "uses above it (0: no cap)")
    p.add_argument("--cache-lease-hours", type=float,
                   default=float(env("KUBETUNE_CACHE_LEASE_HOURS", str(BuildConfig.cache_lease_seconds / 3600))),
                   help="how long a job's lease keeps the entries it uses from eviction (its longest expected run)")
    p.add_argument("--pricing", default=env("KUBETUNE_PRICING", ""),
                   help="price per GPU-hour by nvidia.com/gpu.product, PRODUCT=PRICE,... or a JSON object; gives "
                        "status.estimate.cost and status.accounting.cost")
    p.add_argument("--currency", default=env("KUBETUNE_CURRENCY", "USD"), help="currency of --pricing")
    p.add_argument("--trainer-image", default=env("KUBETUNE_TRAINER_IMAGE", BuildConfig.image))
    p.add_argument("--trainer-image-pull-policy", choices=["Always", "IfNotPresent", "Never"],
                   default=env("KUBETUNE_TRAINER_IMAGE_PULL_POLICY", BuildConfig.image_pull_policy),
                   help="imagePullPolicy of the trainer container")
    p.add_argument("--trainer-image-pull-secrets", default=env("KUBETUNE_TRAINER_IMAGE_PULL_SECRETS", ""),
                   help="name[,name] of Secrets for pulling the trainer image (imagePullSecrets of trainer pods)")
    p.add_argument("--pvc-root", default=env("KUBETUNE_PVC_ROOT", BuildConfig.pvc_root))
    p.add_argument("--termination-grace-base-seconds", type=int,
                   default=int(env("KUBETUNE_TERMINATION_GRACE_BASE_SECONDS",
                                   str(BuildConfig.termination_grace_base_seconds))),
                   help="trainer pods' terminationGracePeriodSeconds before the checkpoint time is added "
                        "(the optimizer step in flight, shutdown)")
    p.add_argument("--checkpoint-write-mib-per-second", type=int,
                   default=int(env("KUBETUNE_CHECKPOINT_WRITE_MIB_PER_SECOND",
                                   str(BuildConfig.checkpoint_write_bytes_per_second // (1024 * 1024)))),
                   help="write rate assumed for the checkpoint a preempted trainer saves within its grace period")
    p.add_argument("--extra-tolerations", default=env("KUBETUNE_EXTRA_TOLERATIONS", "[]"),
                   help="JSON list of tolerations added to every trainer pod")
    p.add_argument("--cpu-node-selector", default=env("KUBETUNE_CPU_NODE_SELECTOR", ""),
                   help="key=value[,key=value] nodeSelector for CPU-only trainer pods (e.g. local process nodes)")
    p.add_argument("--gpu-node-selector", default=env("KUBETUNE_GPU_NODE_SELECTOR", ""),
                   help="key=value[,key=value] nodeSelector for GPU trainer pods (the sizer's own keys win)")
    p.add_argument("--progress-host", default=env("KUBETUNE_PROGRESS_HOST", ""),
                   help="read /progress from this host instead of the rank-0 pod IP (local process nodes)")
    p.add_argument("--progress-port", type=int, default=int(env("KUBETUNE_PROGRESS_PORT", "9090")))
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("--trace-memory", type=int, default=int(env("KUBETUNE_TRACE_MEMORY", "0")), metavar="FRAMES",
                   help="trace Python allocations with this many frames; SIGUSR2 logs what grew since the last "
                        "SIGUSR2 (0 = off; slows the operator several times: for test clusters)")
    return p


class EventHandlersOnlyDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf computes an "essence" of every watch event (a deep copy of the whole object, pod specs and
    managedFields included) to diff it for create/update/resume handlers. kubetune registers only event
    handlers, which never see that diff, so the essence is left empty: it was a sixth of the operator's
    CPU in a burst of 1,000 FineTuneJobs. `make_settings` refuses it if a change handler is registered."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:  # noqa: ARG002 - kopf's signature
        return kopf.BodyEssence()


def has_change_handlers(reg: kopf.OperatorRegistry) -> bool:
    """Whether any create/update/resume/delete (change-detection) handler is registered."""
    return bool(reg._changing.get_all_handlers())  # noqa: SLF001 - kopf has no public accessor


def make_settings(args: argparse.Namespace) -> kopf.OperatorSettings:
    """kopf settings: bookkeeping under kubetune.io, events, watch timeouts; no kopf peering
    (high availability is the Lease of --leader-election)."""
    s = kopf.OperatorSettings()
    s.persistence.finalizer = f"{API_GROUP}/finalizer"
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    if has_change_handlers(registry):
        s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=API_GROUP, key="last-handled-configuration")
    else:
        s.persistence.diffbase_storage = EventHandlersOnlyDiffBase(
            prefix=API_GROUP, key="last-handled-configuration")
    s.posting.enabled = True
    s.posting.level = logging.WARNING  # kopf's own log lines become Events only when they are warnings
    s.posting.reporting_component = "kubetune-operator"
    s.posting.reporting_instance = os.environ.get("POD_NAME", "kubetune-operator")
    s.posting.event_name_prefix = "kubetune-"
    s.watching.server_timeout = 300
    s.watching.client_timeout = 330
    s.watching.connect_timeout = 10
    s.networking.request_timeout = 60
    s.queueing.error_delays = (1, 2, 5, 10, 30, 60)
    s.execution.max_workers = 8
    s.peering.standalone = True
    return s


ACCESS_MODES = ("ReadWriteMany", "ReadWriteOnce", "ReadOnlyMany", "ReadWriteOncePod")


def cache_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The cache claim's BuildConfig fields: with a StorageClass, the claim the operator creates (named by
    --cache-claim, else kubetune-cache)."""
    claim, storage_class = args.cache_claim.strip(), args.cache_storage_class.strip()
    if not storage_class:
        return {"cache_claim": claim}
    modes = tuple(m.strip() for m in args.cache_access_modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in ACCESS_MODES]
    if not modes or unknown:
        raise SystemExit(f"--cache-access-modes: {args.cache_access_modes!r}: use {', '.join(ACCESS_MODES)}")
    if args.cache_size_gib < 1:
        raise SystemExit(f"--cache-size-gib must be at least 1, not {args.cache_size_gib}")
    return {"cache_claim": claim or DEFAULT_CLAIM, "cache_storage_class": storage_class,
            "cache_size_gib": args.cache_size_gib, "cache_access_modes": modes}


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    """OperatorConfig from the flags."""
    tolerations = json.loads(args.extra_tolerations or "[]")
    if not isinstance(tolerations, list):
        raise SystemExit("--extra-tolerations must be a JSON list")
    selector = []
    for item in filter(None, (args.cpu_node_selector or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--cpu-node-selector: {item!r} is not key=value")
        selector.append((key.strip(), value.strip()))
    gpu_selector = []
    for item in filter(None, (args.gpu_node_selector or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--gpu-node-selector: {item!r} is not key=value")
        gpu_selector.append((key.strip(), value.strip()))
    pull_secrets = tuple(n.strip() for n in (args.trainer_image_pull_secrets or "").split(",") if n.strip())
    try:
        pricing = parse_pricing(args.pricing, args.currency)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    cache = cache_settings(args)
    build = BuildConfig(image=args.trainer_image, pvc_root=args.pvc_root,
                        extra_tolerations=tuple(tolerations), cpu_node_selector=tuple(selector),
                        image_pull_policy=args.trainer_image_pull_policy, image_pull_secrets=pull_secrets,
                        gpu_node_selector=tuple(gpu_selector),
                        termination_grace_base_seconds=args.termination_grace_base_seconds,
                        checkpoint_write_bytes_per_second=max(1, args.checkpoint_write_mib_per_second) * 1024 * 1024,
                        cache_mount_path=args.cache_mount_path,
                        cache_max_bytes=max(0, int(args.cache_max_gib * 1024**3)),
                        cache_lease_seconds=max(60, int(args.cache_lease_hours * 3600)), **cache)
    return OperatorConfig(namespaces=list(args.namespace), build=build, resync_seconds=args.resync_seconds,
                          progress_seconds=args.progress_seconds, workers=args.workers,
                          sizing_retry_seconds=args.sizing_retry_seconds, progress_port=args.progress_port,
                          progress_host=args.progress_host, occupancy=args.occupancy,
                          resize_unschedulable_seconds=args.resize_unschedulable_seconds,
                          preflight=args.preflight, pricing=pricing)




# What the apiserver's audit log, request logs and API Priority and Fairness see of the operator's own requests
# (kopf's watch of FineTuneJobs says kopf/<version>).
USER_AGENT = f"kubetune-operator/{__version__}"


def load_kube_client(pool_size: int = RECONCILE_THREADS) -> Any:
    """A kubernetes ApiClient from the in-cluster service account or the kubeconfig."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = pool_size
    api = client.ApiClient(cfg)
    api.user_agent = USER_AGENT
    return api


async def _hold_lease(elector: LeaseElector, renew_every: float, stop: asyncio.Event,
                      stop_waiter: asyncio.Future[Any] | None = None) -> None:
    """Renew the Lease; if it cannot be renewed within its duration, stop the operator.

    stop_waiter: a task awaiting `stop`, created before kopf starts. kopf waits up to 5 s at exit for
    every task created while it runs, so the renew loop must not spawn a new waiter per round."""
    loop = asyncio.get_running_loop()
    if stop_waiter is None:
        stop_waiter = loop.create_task(stop.wait())
    last_ok = loop.time()
    while not stop.is_set():
        try:
            ok = await asyncio.to_thread(elector.try_acquire_or_renew)
        except Exception as exc:  # noqa: BLE001 - a blip; the deadline below decides
            log.warning("renewing the Lease failed: %s", exc)
            ok = False
        if ok:
            last_ok = loop.time()
        else:
            holder = await asyncio.to_thread(elector.holder)
            if holder and holder != elector.identity:
                log.error("lost the Lease to %r: stopping", holder)
                stop.set()
                return
        if loop.time() - last_ok > elector.lease_seconds:
            log.error("could not renew the Lease for %ss: stopping", elector.lease_seconds)
            stop.set()
            return
        await asyncio.wait([stop_waiter], timeout=renew_every)


async def _serve_standby_health(port: int) -> Any:
    """Answer GET /healthz with 200 while this replica waits for the Lease (kopf's own endpoint
    replaces it once leading), so a standby pod passes its liveness/readiness probes."""
    from aiohttp import web

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"leader": False, "state": "standby"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def run_operator(args: argparse.Namespace, memory: MemoryTrace | None = None) -> int:
    """Acquire leadership (if enabled), then run kopf until a signal or the Lease is lost. With `memory`,
    SIGUSR2 logs its report (off the event loop)."""
    api = load_kube_client(max(args.workers, 1) + 2)
    metrics = OperatorMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    config = operator_config(args)
    reconciler = Reconciler(api, config, metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if memory is not None:
        memory.install(loop)

    elector = None
    if args.leader_election:
        lease_ns = args.lease_namespace or (args.namespace[0] if args.namespace else "default")
        elector = LeaseElector(api, lease_ns, args.lease_name, default_identity(), args.lease_seconds)
        log.info("waiting to become the leader (Lease %s/%s, identity %s)", lease_ns, args.lease_name,
                 elector.identity)
        health = await _serve_standby_health(args.liveness_port) if args.liveness_port else None
        try:
            while not stop.is_set():
                try:
                    if await asyncio.to_thread(elector.try_acquire_or_renew):
                        break
                except Exception as exc:  # noqa: BLE001 - an API blip must not end a standby; retry
                    log.warning("could not read or take the Lease: %s", exc)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=max(1.0, args.lease_seconds / 3))
                except asyncio.TimeoutError:
                    pass
        finally:
            if health is not None:
                await health.cleanup()  # frees the port for kopf's liveness endpoint
        if stop.is_set():
            await asyncio.to_thread(elector.release)  # in case the Lease was taken just before the signal
            return 0
        log.info("leading as %s", elector.identity)

    lost = asyncio.Event()
    # Every helper task exists before kopf.operator() starts: kopf treats tasks created while it runs
    # as its own and, at exit, waits up to 5 s for them to finish before the Lease can be released.
    stop_waiter, lost_waiter = loop.create_task(stop.wait()), loop.create_task(lost.wait())
    tasks = [stop_waiter, lost_waiter]
    if elector is not None:
        tasks.append(loop.create_task(_hold_lease(elector, max(1.0, args.lease_seconds / 3), lost,
                                                  lost_waiter)))
    kopf_stop: asyncio.Future[None] = loop.create_future()
    memo = kopf.Memo(reconciler=reconciler, stop_flag=kopf_stop)  # the cleanup handler resolves it

    async def _watch_stops() -> None:
        await asyncio.wait([stop_waiter, lost_waiter], return_when=asyncio.FIRST_COMPLETED)
        if not kopf_stop.done():
            kopf_stop.set_result(None)
    tasks.append(loop.create_task(_watch_stops()))
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    try:
        await kopf.operator(registry=registry, settings=make_settings(args), memo=memo,
                            namespaces=list(args.namespace), clusterwide=not args.namespace,
                            standalone=True,
                            liveness_endpoint=liveness, stop_flag=kopf_stop)
    finally:
        for task in tasks:
            task.cancel()
        if elector is not None and not lost.is_set():
            await asyncio.to_thread(elector.release)
    return 1 if lost.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kubetune operator`."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # kopf.objects logs "Handler ... succeeded" at INFO for every watch event of every job, pod and
        # FineTuneJob: thousands of lines in a burst. Its warnings and errors (failed handlers) still show.
        for noisy in ("kubernetes", "urllib3", "aiohttp", "kopf.objects"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    memory = MemoryTrace(args.trace_memory) if args.trace_memory > 0 else None
    if memory is not None:
        memory.start()
    try:
        return asyncio.run(run_operator(args, memory))
    except KeyboardInterrupt:
        return 0
    finally:
        if memory is not None:
            memory.stop()


if __name__ == "__main__":
    sys.exit(main())
