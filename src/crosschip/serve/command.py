"""`crosschip serve BUNDLE --on SPEC`: the OpenAI-compatible server over one bundle.

The server listens at once and answers /health with 503 while the bundle loads; it prints
`ready on http://HOST:PORT` when /health turns 200. SIGTERM (or Ctrl-C) drains: new
requests get 503, in-flight ones finish (up to --drain-timeout, then they are aborted), and
the process exits 0. A second signal aborts the in-flight requests at once (each still gets a
whole answer, finish_reason "abort"); a third stops the process without waiting for them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from crosschip.config import ServeConfig, check_serve_limits
from crosschip.errors import BundleError, CrosschipError, flag
from crosschip.paths import check_bundle_folder, path_arg, refuse_empty

DEFAULTS = ServeConfig()
API_KEY_ENV = "CROSSCHIP_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=path_arg, help="bundle folder (HF DeepseekV3 layout + tokenizer.json)")
    parser.add_argument(
        "--on",
        default=None,
        metavar="SPEC",
        help="backend that runs the model (torch:cpu, ort:cpu, ...); default: the target the bundle was exported "
        "for (its crosschip.json), else torch:cpu",
    )
    parser.add_argument("--host", default=DEFAULTS.host, help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=DEFAULTS.port)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require `Authorization: Bearer KEY` (env {API_KEY_ENV})",
    )
    parser.add_argument(
        "--model-name",
        "--served-model-name",
        default=None,
        help="model id clients send (default: the bundle folder's name; vLLM's --served-model-name works too)",
    )
    parser.add_argument(
        "--max-batch",
        "--max-num-seqs",
        type=int,
        default=DEFAULTS.max_batch,
        help="sequences decoded together (vLLM's --max-num-seqs works too)",
    )
    parser.add_argument("--max-queue", type=int, default=DEFAULTS.max_queue, help="waiting sequences before 503")
    parser.add_argument("--block-size", type=int, default=DEFAULTS.block_size, help="tokens per latent cache block")
    parser.add_argument(
        "--num-blocks",
        type=int,
        default=DEFAULTS.num_blocks,
        help="latent cache blocks (0 = max-batch full-length sequences)",
    )
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULTS.prefill_chunk, help="prompt tokens fed per step")
    parser.add_argument(
        "--no-prefix-caching",
        "--no-enable-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt whole (default: reuse the cached latents of the full blocks a prompt "
        "shares with an earlier sequence; vLLM's --no-enable-prefix-caching works too)",
    )
    parser.add_argument(
        "--drain-timeout",
        dest="drain_timeout_s",
        type=float,
        default=DEFAULTS.drain_timeout_s,
        help="seconds SIGTERM waits for in-flight requests",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (see serve.compile)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")


def load_engine(args: argparse.Namespace):
    """Executor + tokenizer + async engine for the bundle (runs in a worker thread)."""
    import torch

    from crosschip.serve.engine import AsyncEngine, Engine
    from crosschip.serve.executor import make_executor
    from crosschip.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = dict(max_batch=args.max_batch, block_size=args.block_size, num_blocks=args.num_blocks)
    if args.compile:  # torch backends only (check_flags)
        opts["compile"] = True
    try:
        executor = make_executor(args.bundle, args.on, **opts)
        tokenizer = Tokenizer.load(args.bundle)
        engine = Engine(
            executor,
            tokenizer,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            prefill_chunk=args.prefill_chunk,
            prefix_caching=args.prefix_caching,
        )
    except MemoryError:  # the pool is refused first (pool_blocks); this is for the buffers sized by --max-batch
        raise CrosschipError(
            f"--num-blocks {args.num_blocks}, --block-size {args.block_size} and --max-batch {args.max_batch} "
            "ask for more memory than this machine has; lower them"
        ) from None
    front = AsyncEngine(engine)
    front.start()
    return front, tokenizer


def check_flags(args: argparse.Namespace) -> None:
    """Values the server cannot run with, named by their flags, before anything starts."""
    check_serve_limits(args, flag)
    if args.compile and not args.on.startswith("torch:"):
        raise CrosschipError(f"--compile is torch.compile, for torch backends; {args.on} optimizes its own graph")
    if args.threads < 0:
        raise CrosschipError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    cpus = os.cpu_count() or 1
    if args.threads > cpus:  # 100000 crashed torch's thread pool (a segfault, no word said)
        raise CrosschipError(
            f"--threads {args.threads:,} is more than this machine's {cpus} CPUs; give {cpus} or fewer"
        )
    # An empty value is most often an unset shell variable (`--api-key "$KEY"`): served as it
    # was, it would open the server to anyone, or name the model after the folder, silently.
    if args.api_key == "":
        raise CrosschipError("--api-key is empty; give the key, or leave the flag out to serve without one")
    refuse_empty(args.model_name, "--model-name", "give a name, or leave the flag out for the bundle folder's name")


# A server bound to a wildcard address answers on loopback.
WILDCARD_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def cache_line(executor) -> str:
    """The latent cache's size, and its cost per token per layer (MLA caches c_kv and k_pe only)."""
    usage, cfg = executor.cache_usage(), executor.cfg
    per_token = usage["bytes_per_token_per_layer"]
    return (
        f"crosschip serve: latent cache {usage['blocks_total']:,} blocks of {usage['block_size']} tokens"
        f" ({usage['bytes_total'] / 2**20:,.1f} MiB); {per_token} bytes per token per layer"
        f" = (kv_lora_rank {cfg.kv_lora_rank} + qk_rope_head_dim {cfg.qk_rope_head_dim})"
        f" x {per_token // cfg.latent_dim} bytes"
    )


def client_url(host: str, port: int) -> str:
    """`http://HOST:PORT` as a client on this machine reaches a server bound to `host`
    (a wildcard through loopback, an IPv6 address in brackets)."""
    host = WILDCARD_LOOPBACK.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_listen(host: str, port: int, host_label: str = "--host") -> None:
    """Bind HOST:PORT once, as uvicorn will (with SO_REUSEADDR), before loading anything: a
    port in use or an unknown host is a one-line error here, where uvicorn's own failure is
    a SystemExit raised inside the event loop (a traceback, exit 3). Port 0 checks the host."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise CrosschipError(f"{host_label} {host}: {e.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise CrosschipError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def exported_for(bundle) -> str:
    """The backend `crosschip export --to` wrote `bundle` for, else torch:cpu: an ONNX Runtime
    bundle served through torch by default, its graphs unused."""
    try:  # read here without torch (hf imports it); a damaged manifest is the loader's to report
        manifest = json.loads((bundle / "crosschip.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    target = manifest.get("target") if isinstance(manifest, dict) else None
    spec = target.get("spec") if isinstance(target, dict) else None
    return spec if isinstance(spec, str) and spec else "torch:cpu"


def run(args: argparse.Namespace) -> int:
    check_bundle_folder(args.bundle)
    if not (args.bundle / "tokenizer.json").is_file():
        raise BundleError(f"bundle has no tokenizer.json: {args.bundle}")
    args.on = args.on or exported_for(args.bundle)
    check_flags(args)
    check_listen(args.host, args.port)
    # The server's runtime (torch, the web stack) only once the command line is known to be good.
    import uvicorn

    from crosschip.serve.api import ServerState, create_app

    # The engine thread runs Python between torch ops; a shorter GIL switch interval than the
    # default 5 ms lets the event loop answer and stream while a step is running.
    sys.setswitchinterval(0.0005)
    state = ServerState(model_name=args.model_name or args.bundle.resolve().name, api_key=args.api_key)
    app = create_app(state)
    # No lifespan: the app has no startup or shutdown hooks (the engine loads in
    # run_until_drained), and a second SIGTERM, which cancels the lifespan task mid-shutdown,
    # made starlette log that cancellation as a traceback.
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="off",
    )
    server = DrainingServer(config, state, args.drain_timeout_s)
    return asyncio.run(server.run_until_drained(args))


class DrainingServer:
    """uvicorn with a drain on SIGTERM/SIGINT instead of an immediate stop."""

    def __init__(self, config, state, drain_timeout: float):
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):  # signal handler, main thread
                outer.on_signal(sig)

        self.server = _Server(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_started = False
        self.cut_short = False
        self.load_error: BaseException | None = None

    def on_signal(self, sig: int) -> None:
        if self.drain_started and not self.cut_short and self.loop is not None:
            # A second signal: end the drain now. The requests in flight end as aborted, each
            # with a well-formed answer; uvicorn's force exit cancelled their handlers, which
            # answered 500 in plain text, cut streams mid-chunk and logged tracebacks.
            self.cut_short = True
            print("crosschip serve: stopping now: aborting the requests in flight", file=sys.stderr, flush=True)
            return
        if self.drain_started:  # a third signal (or one while the engine loads): stop at once
            self.server.should_exit = True
            self.server.force_exit = True
            return
        self.drain_started = True
        self.state.draining = True
        print(
            f"crosschip serve: {signal.Signals(sig).name}: draining (up to {self.drain_timeout:g}s)",
            file=sys.stderr,
            flush=True,
        )
        if self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.drain()))

    async def drain(self) -> None:
        front = self.state.engine
        if front is not None:
            front.engine.admitting = False
            deadline = time.monotonic() + self.drain_timeout
            while front.engine.requests and time.monotonic() < deadline and not self.cut_short:
                await asyncio.sleep(0.02)
            for rid in list(front.engine.requests):
                front.abort(rid)
            await asyncio.sleep(0.1)  # let the aborted streams end
        self.server.should_exit = True

    async def run_until_drained(self, args: argparse.Namespace) -> int:
        self.loop = asyncio.get_running_loop()
        serving = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if serving.done():
                serving.result()
                raise CrosschipError(f"could not start the server on {args.host}:{args.port}")
            await asyncio.sleep(0.01)
        try:
            front, tokenizer = await asyncio.to_thread(load_engine, args)
        except BaseException as e:
            self.server.should_exit = True
            await serving
            raise e
        self.state.set_engine(front, tokenizer)
        print(cache_line(front.engine.executor), flush=True)
        if not self.drain_started:  # a SIGTERM during loading means: never become ready
            port = self.server.servers[0].sockets[0].getsockname()[1]
            url = client_url(args.host, port)
            bound = f" (bound to {args.host or '*'})" if args.host in WILDCARD_LOOPBACK else ""
            print(f"crosschip serve: {args.on}, model {self.state.model_name!r}; ready on {url}{bound}", flush=True)
        await serving
        front.shutdown()
        return 0
