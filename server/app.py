"""Server lifecycle: build, start, serve until SIGTERM, drain, stop.

:class:`GradIndexServer` wires the servicer, the standard ``grpc.health.v1`` health service,
optional reflection, token auth, TLS, message-size and concurrency limits, and Prometheus metrics.
Shutdown is graceful: health turns NOT_SERVING (so load balancers stop sending), after an
optional drain delay new RPCs are refused with UNAVAILABLE, in-flight RPCs get ``grace_s`` to
finish, then the process exits.
"""

from __future__ import annotations

import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.auth import TokenAuthInterceptor, method_label
from server.config import ServerConfig
from server.observability import Metrics, setup_logging
from server.protos import service_pb2
from server.registry import Registry, Served
from server.service import GradIndexServicer

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GradIndex"].full_name
#: The server's method table: the only paths that become metric labels.
KNOWN_METHODS = frozenset(f"/{SERVICE_NAME}/{m.name}"
                          for m in service_pb2.DESCRIPTOR.services_by_name["GradIndex"].methods)


def _check_tls_pair(cert: str, key: str) -> None:
    """Load the TLS pair with the ssl module first: a mismatch or unreadable file is a config error
    naming tls.cert/tls.key, not gRPC's "could not bind"."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ValueError(f"tls: cannot read {exc.filename}: check tls.cert and tls.key") from None
    except ssl.SSLError as exc:
        raise ValueError(f"tls.cert and tls.key are not a matching PEM certificate and private key ({exc.reason}): "
                         "check that the key is the certificate's") from None


def add_servicer(servicer: GradIndexServicer, server: grpc.Server, metrics: Metrics) -> None:
    """Register the servicer with requests parsed in the handler, not by gRPC.

    gRPC's own deserializer turns bytes that are not the request message into INTERNAL
    ("Exception deserializing request"); parsing here makes them INVALID_ARGUMENT saying what to
    send, counted under the method's own label.
    """
    from google.protobuf.message import DecodeError
    from google.protobuf.message_factory import GetMessageClass

    handlers = {}
    for m in service_pb2.DESCRIPTOR.services_by_name["GradIndex"].methods:
        req_cls, resp_cls = GetMessageClass(m.input_type), GetMessageClass(m.output_type)
        method = getattr(servicer, m.name)

        def handle(raw: bytes, context, _method=method, _req=req_cls, _name=m.name):
            try:
                request = _req.FromString(raw)
            except (DecodeError, RuntimeError, ValueError) as exc:  # noqa: F841 - bytes are not the message
                metrics.requests.labels(_name, "INVALID_ARGUMENT").inc()
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request bytes are not a valid {_req.DESCRIPTOR.full_name} message; "
                              "send a serialized protobuf of that type")
            return _method(request, context)

        handlers[m.name] = grpc.unary_unary_rpc_method_handler(handle, request_deserializer=None,
                                                               response_serializer=resp_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # as the generated code does


class GradIndexServer:
    """One running gradindex gRPC server; ``start()`` binds, ``stop()`` drains and stops."""

    def __init__(self, config: ServerConfig, registry: Registry | None = None) -> None:
        self.config = config.validate()
        self.log = setup_logging(config.log_level)
        self.metrics = Metrics()
        self.registry = registry if registry is not None else Registry(
            config.workdir, config.indexes or None, max_k=config.max_k, catalog_url=config.catalog_url)
        self.registry.subscribe(self._index_changed)
        self.health = health.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._stopped = threading.Event()
        self._server: grpc.Server | None = None
        self.servicer: GradIndexServicer | None = None

    def _index_changed(self, served: Served) -> None:
        self.metrics.index_generation.labels(served.name).set(served.generation)
        self.metrics.index_count.labels(served.name).set(served.description.count)

    def start(self) -> "GradIndexServer":
        """Bind the port (``config.port`` 0 = a free port, then in ``self.port``) and start serving."""
        cfg = self.config
        interceptors = []
        if cfg.token:
            interceptors.append(TokenAuthInterceptor(
                cfg.token, cfg.admin_token,
                on_deny=lambda m, c: self.metrics.requests.labels(method_label(m, KNOWN_METHODS), c.name).inc()))
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="rpc"),
                             interceptors=interceptors, options=options,
                             maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        servicer = GradIndexServicer(self.registry, self.metrics, cfg)
        self.servicer = servicer
        add_servicer(servicer, server, self.metrics)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if cfg.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            _check_tls_pair(cfg.tls_cert, cfg.tls_key)
            creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"could not bind {address}: is the port in use?")
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_host)
        server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.log.info("serving", extra={"fields": {
            "event": "start", "address": f"{cfg.host}:{self.port}", "tls": bool(cfg.tls_cert),
            "auth": bool(cfg.token), "reflection": cfg.reflection, "metrics_port": self.metrics_port,
            "batching": {"window_ms": cfg.batch_window_ms, "max_examples": cfg.batch_max_examples},
            "indexes": [s.name for s in self.registry.all()]}})
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, drain delay, refuse new RPCs, let in-flight ones finish."""
        if self._server is None or self._stopped.is_set():
            return
        grace = self.config.grace_s if grace is None else grace
        self.log.info("shutting down", extra={"fields": {"event": "shutdown", "grace_s": grace}})
        self.health.enter_graceful_shutdown()
        if self.config.drain_delay_s > 0:
            self._stopped.wait(self.config.drain_delay_s)
        self._server.stop(grace).wait()
        if self.servicer is not None:
            self.servicer.close()  # after the drain: in-flight queries finished their batches
        self.metrics.close()
        self._stopped.set()
        self.log.info("stopped", extra={"fields": {"event": "stopped"}})

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped; True if it stopped within ``timeout``."""
        return self._stopped.wait(timeout)

    def serve_forever(self) -> None:
        """Start if needed, then block until SIGTERM/SIGINT and shut down gracefully (main thread only)."""
        if self._server is None:
            self.start()
        requested = threading.Event()

        def on_signal(signum, _frame):
            self.log.info("signal", extra={"fields": {"event": "signal", "signal": signal.Signals(signum).name}})
            requested.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        while not requested.wait(0.5):
            pass
        self.stop()


__all__ = ["GradIndexServer", "SERVICE_NAME"]
