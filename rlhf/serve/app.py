"""Building and running the Serve application from a ServeConfig (jobs/serve.py)."""

from __future__ import annotations

import hashlib
import os
import time

from ray import serve

from rlhf.config.core import ConfigError
from rlhf.metrics import emit
from rlhf.runtime import init_ray
from rlhf.serve.api import FeedbackApi
from rlhf.serve.config import ServeConfig
from rlhf.serve.deployment import PolicyDeployment
from rlhf.store import check_url, redact_url

APP_NAME = "rlhf"
MIN_ADMIN_TOKEN_BYTES = 32  # as long as a labeler token: guessing either is hopeless


def _admin_token_digest(env_name: str) -> str | None:
    """SHA-256 of the admin token, read here on the driver: only the digest reaches the replicas,
    so the secret never appears in Serve's deployment config or the dashboard. A short token is
    refused before anything starts."""
    token = os.environ.get(env_name, "")
    if not token:
        return None
    if len(token.encode()) < MIN_ADMIN_TOKEN_BYTES:
        raise ConfigError(
            "serve.admin_token_env", f"the token in {env_name} has {len(token.encode())} bytes; use at least "
            f"{MIN_ADMIN_TOKEN_BYTES}, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return hashlib.sha256(token.encode()).hexdigest()


def build_app(cfg: ServeConfig) -> serve.Application:
    """The ingress bound to the policy deployment, with replicas and autoscaling from config."""
    serving = cfg.serve
    scaling: dict = (
        {"autoscaling_config": {"min_replicas": serving.min_replicas, "max_replicas": serving.max_replicas,
                                "target_ongoing_requests": serving.target_ongoing_requests}}
        if serving.autoscale else {"num_replicas": serving.replicas}
    )
    # mypy keeps a decorated class's own type: @serve.deployment made these Deployments
    policy = PolicyDeployment.options(  # type: ignore[attr-defined]
        ray_actor_options={"num_cpus": serving.cpus_per_replica, "num_gpus": serving.gpus_per_replica},
        # Enough queued requests per replica to fill a batch for each of the two comparison halves.
        max_ongoing_requests=max(2 * serving.max_batch_size, 8),
        **scaling,
    ).bind(cfg)
    api = FeedbackApi.options(  # type: ignore[attr-defined]  # a Deployment, as above
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256
    )
    return api.bind(policy, cfg, _admin_token_digest(serving.admin_token_env))


def http_options(cfg: ServeConfig) -> dict:
    """Serve's HTTP proxy options: address and TLS."""
    serving = cfg.serve
    options: dict = {"host": serving.host, "port": serving.port}
    if serving.ssl_certfile:
        options |= {"ssl_certfile": serving.ssl_certfile, "ssl_keyfile": serving.ssl_keyfile}
    return options


def start_app(cfg: ServeConfig) -> str:
    """Deploy on the connected (or a new local) Ray cluster; returns the base URL."""
    app = build_app(cfg)  # reads the admin token first: a bad one stops before Ray starts
    init_ray()
    serve.start(http_options=http_options(cfg))
    serve.run(app, name=APP_NAME, route_prefix="/")
    scheme = "https" if cfg.serve.ssl_certfile else "http"
    return f"{scheme}://{cfg.serve.host}:{cfg.serve.port}"


def run_serve(cfg: ServeConfig) -> None:
    """Serve until interrupted (``ray job stop`` or Ctrl-C)."""
    check_url(cfg.store.url)  # a bad URL would otherwise fail later, inside a replica
    try:
        url = start_app(cfg)
        # a Deployment (see build_app), so it has the name Serve knows it by
        policy = serve.get_deployment_handle(PolicyDeployment.name, APP_NAME)  # type: ignore[attr-defined]
        version = policy.policy_info.remote().result()["version"]
        emit(f"serving policy {version} at {url}/ (API docs at {url}/docs); registry {cfg.registry}, "
             f"feedback in {redact_url(cfg.store.url)}")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        emit("stopping: deleting the Serve application")
        serve.delete(APP_NAME)
