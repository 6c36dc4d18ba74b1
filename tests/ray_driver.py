"""A Ray driver joined to a running `serve run` cluster, in its own process, and its client.

Tests that ask the stages themselves (`ThinkerStage.engine_stats`, `DiTStage.stats`), call a named
actor or kill a replica do it through `RayDriver`, which runs this file as a script and talks to it
over stdin/stdout, one JSON object per line. The driver is out of the pytest process on purpose:
joining a cluster with Ray's token auth sets process-wide Ray state (`ray._raylet.Config`) that no
`ray.shutdown()` undoes, and a later `ray.init()` of another test module in the same process then
fails to start its own local cluster.

    python tests/ray_driver.py <gcs host:port>        (env: RAY_AUTH_TOKEN_PATH, RAY_AUTH_MODE)
    -> {"ok": true} once joined; then for each request line {"op": ..., ...}
    -> {"ok": true, "result": ...} or {"ok": false, "error": "..."}
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


class RayDriverError(RuntimeError):
    pass


class RayDriver:
    """The client: a driver process joined to the cluster whose GCS is at `address`; `home` is the
    server's HOME, where Ray wrote the cluster's auth token."""

    def __init__(self, address: str, home: Path, join_timeout_s: float = 120):
        env = dict(os.environ, RAY_AUTH_TOKEN_PATH=str(home / ".ray" / "auth_token"),
                   RAY_AUTH_MODE="token", PYTHONPATH=str(REPO_ROOT))
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen([sys.executable, __file__, address], cwd=REPO_ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1)
        self.lock = threading.Lock()   # watcher threads and the test share the one pipe
        self._read(join_timeout_s)

    def _read(self, timeout_s: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RayDriverError(f"no answer from the Ray driver in {timeout_s}s "
                                 f"(exit code {self.proc.poll()})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RayDriverError(reply["error"])
        return reply.get("result")

    def _ask(self, timeout_s: float = 90, **request):
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            return self._read(timeout_s)

    def call(self, deployment: str, method: str, *args, app_name: str = "lance"):
        """`method(*args)` of a Serve deployment (JSON arguments and result)."""
        return self._ask(op="call", deployment=deployment, method=method, args=list(args),
                         app_name=app_name)

    def call_actor(self, name: str, namespace: str, method: str, *args):
        """`method(*args)` of a named actor."""
        return self._ask(op="call_actor", name=name, namespace=namespace, method=method,
                         args=list(args))

    def kill_replica(self, deployment: str) -> str:
        """Kill one replica actor of a deployment, as a crash would (Serve starts a new one)."""
        return self._ask(op="kill_replica", deployment=deployment)

    def object_store(self) -> dict:
        """The cluster's object store after a garbage collection in every worker (Python cycles
        may hold ObjectRefs a while): {"bytes_used", "num_objects", "primary_copies"}."""
        return self._ask(op="object_store")

    def running_tasks(self) -> dict:
        """{task name: count} of the tasks and actor calls RUNNING now (Ray's state API; Serve
        reports its replicas' calls there only when the cluster runs with
        RAY_SERVE_ENABLE_TASK_EVENTS=1)."""
        return self._ask(op="running_tasks")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# the stage deployments of the cpu graph's two variants (serve_app.app_config.deployment_name)
STAGE_SUFFIXES = ("", "_Lance_3B_Video")
TASK_EVENTS_DELAY_S = 3.0


def leak_census(driver: RayDriver, suffixes=STAGE_SUFFIXES) -> dict:
    """Everything a finished, cancelled, timed-out or refused request could leave behind, for
    comparing an idle server with itself before: per thinker the exports not claimed, requests
    still in vLLM and KV blocks in use (as of vLLM's last step: send each thinker a short request
    first, an abort is no step); per DiT its job table; the object store's objects and bytes; the
    Serve request calls running on any replica."""
    state = {}
    for suffix in suffixes:
        t = driver.call("ThinkerStage" + suffix, "engine_stats")
        d = driver.call("DiTStage" + suffix, "stats")
        state["thinker" + suffix] = {k: t[k] for k in ("pending_exports", "submitted_requests",
                                                       "num_running", "num_waiting", "kv_blocks_in_use")}
        state["dit" + suffix] = {k: d[k] for k in ("jobs", "active", "waiting")}
    store = driver.object_store()
    state["object_store"] = {"num_objects": store["num_objects"], "bytes_used": store["bytes_used"]}
    # Ray's state API hears of finished tasks a second or so late (task events are batched):
    # the calls above must not be counted as running
    time.sleep(TASK_EVENTS_DELAY_S)
    state["running_requests"] = running_requests(driver)
    return state


def leaks(baseline: dict, after: dict) -> dict:
    """What `after` holds beyond `baseline` (two leak_census states): {key: (before, after)}. The
    object store counts only if it grew: a killed replica's own objects go with it, so after a kill
    it may well hold less than before."""
    found = {}
    for key in baseline.keys() | after.keys():
        before, now = baseline.get(key), after.get(key)
        if key == "object_store":
            if now["num_objects"] > before["num_objects"] or now["bytes_used"] > before["bytes_used"]:
                found[key] = (before, now)
        elif before != now:
            found[key] = (before, now)
    return found


def running_requests(driver: RayDriver) -> dict:
    """{task name: count} of the Serve request calls RUNNING on any replica (health checks and
    Serve's own loops excluded)."""
    return {name: n for name, n in driver.running_tasks().items() if "handle_request" in name}


def main(address: str) -> None:
    # replies go to the real stdout; anything Ray or a library prints goes to stderr
    replies, sys.stdout = sys.stdout, sys.stderr
    import ray
    from ray import serve

    ray.init(address=address, log_to_driver=False)
    handles: dict = {}

    def call(deployment, method, args, app_name):
        if (deployment, app_name) not in handles:
            handles[deployment, app_name] = serve.get_deployment_handle(deployment,
                                                                        app_name=app_name)
        return getattr(handles[deployment, app_name], method).remote(*args).result(timeout_s=60)

    def call_actor(name, namespace, method, args):
        actor = ray.get_actor(name, namespace=namespace)
        return ray.get(getattr(actor, method).remote(*args), timeout=60)

    def kill_replica(deployment):
        names = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA") and f"#{deployment}#" in a["name"]]
        if not names:
            raise LookupError(f"no {deployment} replica found")
        ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]),
                 no_restart=True)
        return names[0]["name"]

    def object_store():
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address, global_gc

        global_gc()
        stats = get_memory_info_reply(get_state_from_address(address)).store_stats
        return {"bytes_used": stats.object_store_bytes_used, "num_objects": stats.num_local_objects,
                "primary_copies": stats.num_object_store_primary_copies}

    def running_tasks():
        from collections import Counter

        from ray.util.state import list_actors, list_tasks

        # a killed actor's last calls may stay RUNNING in the task table: count live actors' only
        alive = {a.actor_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10000,
                                                 raise_on_missing_output=False)}
        tasks = list_tasks(filters=[("state", "=", "RUNNING")], limit=10000, detail=True,
                           raise_on_missing_output=False)
        return dict(Counter(t.name for t in tasks if not t.actor_id or t.actor_id in alive))

    ops = {"call": call, "call_actor": call_actor, "kill_replica": kill_replica,
           "object_store": object_store, "running_tasks": running_tasks}
    print(json.dumps({"ok": True}), file=replies, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            reply = {"ok": True, "result": ops[request.pop("op")](**request)}
        except Exception as e:   # the test sees the failure; the driver stays up for the next one
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply, default=str), file=replies, flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
