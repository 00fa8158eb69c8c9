"""kubetune's container images in tests: built by ``hack/images/build.sh``, run by docker the way
a kubelet would run a pod's container.

:func:`run_like_kubelet` turns a rendered pod spec into ``docker run`` flags: command and args,
plain env values, the user and group, a read-only root, dropped capabilities, no privilege
escalation, the cpu and memory limits, the volumes, and the ServiceAccount token where in-cluster
config looks for it. In the security context, env, limits and volumes, a field it cannot express
raises :class:`Untranslatable`, so a change there is never silently left out of a test; what
only places a pod (node selector, tolerations, requests) has no meaning on one machine.

A container that logs in to the API server shares the host's network, where the test cluster's
API server listens; any other gets a network of its own, with its ports published on loopback.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kubetune.api.types import quantity_value
from support.cluster import wait_until

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "hack" / "images" / "build.sh"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class ImageError(RuntimeError):
    pass


class Untranslatable(ValueError):
    """A pod spec field that ``docker run`` cannot express here."""


def build(target: str) -> str:
    """Builds ``kubetune/<target>:dev`` from this checkout (installing and starting docker on a
    fresh root Debian machine) and returns its name."""
    proc = subprocess.run(
        ["bash", str(BUILD), target], capture_output=True, text=True, timeout=1800, check=False
    )
    if proc.returncode != 0:
        raise ImageError(f"hack/images/build.sh {target} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout.split()[-1]


@dataclass(frozen=True)
class ServiceAccountLogin:
    """What a kubelet mounts for a pod's ServiceAccount, and where the API server is."""

    token: str
    ca_pem: bytes
    namespace: str
    host: str
    port: int

    def write(self, folder: Path) -> Path:
        folder.mkdir(mode=0o755)
        (folder / "token").write_text(self.token)
        (folder / "ca.crt").write_bytes(self.ca_pem)
        (folder / "namespace").write_text(self.namespace)
        for path in [folder, *folder.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # the container's user reads them
        return folder


@dataclass
class Container:
    name: str

    def _docker(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", *args], capture_output=True, text=True, timeout=timeout, check=check
        )

    def state(self) -> dict[str, Any]:
        out = self._docker("inspect", "--format", "{{json .State}}", self.name).stdout
        return dict(json.loads(out))

    def logs(self) -> str:
        proc = self._docker("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def assert_alive(self) -> None:
        if not self.state()["Running"]:
            logs = self.logs()
            # The first error is usually the cause; the tail is how it ended.
            errors = [line for line in logs.splitlines() if "Error" in line][:10]
            raise AssertionError(
                "container exited; first errors:\n" + "\n".join(errors) + "\n...\n" + logs[-3000:]
            )

    def wait_for_probe(self, url: str, timeout: float) -> None:
        """Polls an HTTP probe until it answers 200; fails at once, with the container's logs,
        if the container exits, and with them too when ``timeout`` runs out."""

        def answers() -> bool:
            self.assert_alive()
            try:
                return httpx.get(url, timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(answers, timeout=timeout, description=f"{url} to answer 200", interval=1)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.logs()[-4000:]}") from None

    def port(self, container_port: int) -> int:
        """The host port that ``container_port`` is published on (pods off the host network)."""
        out = self._docker("port", self.name, f"{container_port}/tcp").stdout
        return int(out.split()[0].rsplit(":", 1)[1])

    def wait(self, timeout: float) -> int:
        """Waits for the container to exit; returns its exit code."""
        return int(self._docker("wait", self.name, timeout=timeout).stdout.strip())

    def stop(self, grace_seconds: int) -> int:
        """SIGTERM, then SIGKILL after ``grace_seconds`` (a pod's terminationGracePeriod);
        returns the exit code."""
        self._docker("stop", "--time", str(grace_seconds), self.name)
        return int(self.state()["ExitCode"])

    def remove(self) -> None:
        self._docker("rm", "--force", self.name, check=False)


def volume_args(
    pod: dict[str, Any], container: dict[str, Any], sources: Mapping[str, Path]
) -> list[str]:
    """emptyDir volumes become tmpfs mounts; any other volume (a PVC, a ConfigMap) is the host
    folder ``sources`` gives for its name, with the mount's subPath and readOnly."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    args: list[str] = []
    for mount in container.get("volumeMounts", []):
        volume, path = volumes[mount["name"]], mount["mountPath"]
        if "emptyDir" in volume:
            size = (volume["emptyDir"] or {}).get("sizeLimit")
            tmpfs = f"type=tmpfs,destination={path}"
            args += [
                "--mount",
                tmpfs + (f",tmpfs-size={int(quantity_value(size))}" if size else ""),
            ]
            continue
        if mount["name"] not in sources:
            raise Untranslatable(f"volume {mount['name']}: no host folder given for it")
        host = sources[mount["name"]] / mount.get("subPath", "")
        if not host.exists():  # the test prepares it, owned by the pod's user
            raise FileNotFoundError(f"{host} (volume {mount['name']}, at {path})")
        readonly = ",readonly" if mount.get("readOnly") else ""
        args += ["--mount", f"type=bind,source={host},destination={path}{readonly}"]
    return args


def docker_run_args(
    image: str,
    pod: dict[str, Any],
    container: dict[str, Any],
    *,
    sources: Mapping[str, Path],
    login: Path | None,
    api: tuple[str, int] | None,
) -> list[str]:
    pod_sc = dict(pod.get("securityContext") or {})
    pod_sc.pop("fsGroup", None)  # the test's host folders are made writable for the user instead
    sc = {**pod_sc, **(container.get("securityContext") or {})}
    if api is not None:  # the host's network, where the test cluster's API server listens
        args = ["--network", "host", "--env", f"KUBERNETES_SERVICE_HOST={api[0]}"]
        args += ["--env", f"KUBERNETES_SERVICE_PORT={api[1]}"]
    else:  # a network of its own, as a pod has; its ports on free loopback ports of the host
        args = [f"--publish=127.0.0.1::{p['containerPort']}" for p in container.get("ports", [])]
    user, group = sc.pop("runAsUser", None), sc.pop("runAsGroup", None)
    if sc.pop("runAsNonRoot", False) and not user:
        raise Untranslatable("runAsNonRoot needs a non-zero runAsUser here (kubelet checks images)")
    if user is not None:
        args += ["--user", f"{user}" if group is None else f"{user}:{group}"]
    if sc.pop("readOnlyRootFilesystem", False):
        args.append("--read-only")
    if sc.pop("allowPrivilegeEscalation", True) is False:
        args += ["--security-opt", "no-new-privileges"]
    caps = sc.pop("capabilities", {})
    args += [f"--cap-drop={c}" for c in caps.pop("drop", [])]
    args += [f"--cap-add={c}" for c in caps.pop("add", [])]
    if sc.pop("seccompProfile", {}).get("type", "RuntimeDefault") != "RuntimeDefault":
        raise Untranslatable("seccompProfile other than RuntimeDefault (docker's default)")
    if sc or caps:
        raise Untranslatable(f"securityContext fields {sorted(sc) + sorted(caps)}")

    for env in container.get("env", []):
        if "value" not in env:
            raise Untranslatable(f"env {env['name']} is not a plain value")
        args += ["--env", f"{env['name']}={env['value']}"]
    limits = dict((container.get("resources") or {}).get("limits", {}))
    if "memory" in limits:
        args += ["--memory", str(int(quantity_value(limits.pop("memory"))))]
    if "cpu" in limits:
        args += ["--cpus", str(quantity_value(limits.pop("cpu")))]
    if limits:  # GPUs and other extended resources
        raise Untranslatable(f"limits {sorted(limits)}")
    args += volume_args(pod, container, sources)
    if login is not None:
        args += ["--mount", f"type=bind,source={login},destination={SERVICE_ACCOUNT_DIR},readonly"]
    command = container.get("command") or []
    if command:
        args += ["--entrypoint", command[0]]
    return [*args, image, *command[1:], *container.get("args", [])]


def run_like_kubelet(
    image: str,
    pod: dict[str, Any],
    *,
    workdir: Path,
    login: ServiceAccountLogin | None = None,
    sources: Mapping[str, Path] | None = None,
) -> Container:
    """Starts the pod's (only) container detached and returns it. ``login``: the ServiceAccount
    and API server it reaches (none: not in a cluster); ``sources``: host folders for its
    volumes other than emptyDir."""
    (spec,) = pod["containers"]
    folder = login.write(workdir / "serviceaccount") if login else None
    name = f"kubetune-test-{spec['name']}-{uuid.uuid4().hex[:8]}"
    api = (login.host, login.port) if login else None
    flags = docker_run_args(image, pod, spec, sources=sources or {}, login=folder, api=api)
    proc = subprocess.run(
        ["docker", "run", "--detach", "--name", name, "--label", "io.kubetune.test=1", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise ImageError(f"docker run {image} failed:\n{proc.stderr}")
    return Container(name)
