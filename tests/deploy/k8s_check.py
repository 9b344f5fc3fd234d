"""Validates deploy/k8s/*.yaml: parses every document (PyYAML) and checks the fields that
make the MPIJob, its control-plane Service and the token Secret work together."""
import glob
import os
import re
import sys

import yaml

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)


def main(k8s_dir):
    docs = []
    for path in sorted(glob.glob(os.path.join(k8s_dir, "*.yaml"))):
        with open(path) as f:
            for d in yaml.safe_load_all(f):
                if d is not None:
                    docs.append((os.path.basename(path), d))
    by_kind = {}
    for name, d in docs:
        check("apiVersion" in d and "kind" in d and "name" in d.get("metadata", {}),
              f"{name}: apiVersion, kind and metadata.name are required")
        by_kind.setdefault(d["kind"], []).append(d)
    for kind in ("MPIJob", "Service", "Secret"):
        check(len(by_kind.get(kind, [])) == 1, f"expected exactly one {kind}")
    if failures:
        return
    job, svc, secret = by_kind["MPIJob"][0], by_kind["Service"][0], by_kind["Secret"][0]

    # The MPIJob (kubeflow.org/v2beta1).
    check(job["apiVersion"] == "kubeflow.org/v2beta1", "MPIJob apiVersion kubeflow.org/v2beta1")
    spec = job["spec"]
    check(spec.get("mpiImplementation") == "OpenMPI", "mpiImplementation: OpenMPI")
    slots = spec.get("slotsPerWorker")
    check(isinstance(slots, int) and slots >= 1, "slotsPerWorker: a positive integer")
    replicas = spec["mpiReplicaSpecs"]
    check(set(replicas) == {"Launcher", "Worker"}, "mpiReplicaSpecs: Launcher and Worker")
    check(replicas["Launcher"].get("replicas") == 1, "one launcher")
    workers = replicas["Worker"].get("replicas")
    check(isinstance(workers, int) and workers >= 1, "Worker replicas: a positive integer")
    launcher = replicas["Launcher"]["template"]["spec"]["containers"][0]
    worker_pod = replicas["Worker"]["template"]["spec"]
    worker = worker_pod["containers"][0]
    argv = list(launcher.get("command", [])) + list(launcher.get("args", []))
    check(argv and argv[0] == "mpirun", "the launcher runs mpirun")
    check(all(isinstance(a, str) for a in argv), "launcher command/args are strings")
    np_ = int(argv[argv.index("-np") + 1]) if "-np" in argv else None
    check(np_ == workers * slots, f"mpirun -np {np_} == Worker replicas x slotsPerWorker = {workers * slots}")
    gpus = worker.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    check(gpus == slots, f"one rank per GPU: nvidia.com/gpu limit {gpus} == slotsPerWorker {slots}")
    env = {}
    for i, a in enumerate(argv):
        if a == "-x" and i + 1 < len(argv) and "=" in argv[i + 1]:
            k, v = argv[i + 1].split("=", 1)
            env[k] = v
    check("CELO2_CONTROL_ADDR" in env, "mpirun -x CELO2_CONTROL_ADDR")
    check("CELO2_CONTROL_TOKEN_FILE" in env, "mpirun -x CELO2_CONTROL_TOKEN_FILE")
    check("OMP_NUM_THREADS" in env, "mpirun -x OMP_NUM_THREADS")
    m = re.fullmatch(r"(.*):(\d+)", env.get("CELO2_CONTROL_ADDR", ""))
    check(m is not None and m.group(1) in ("0.0.0.0", "[::]"),
          "the control plane binds all interfaces in the pod (0.0.0.0:PORT), reachable by the Service")
    ctl_port = int(m.group(2)) if m else None
    check(launcher["image"] == worker["image"], "launcher and workers run the same image")

    # The token: a Secret mounted read-only into the workers at CELO2_CONTROL_TOKEN_FILE.
    check(secret["apiVersion"] == "v1" and "token" in {**secret.get("data", {}), **secret.get("stringData", {})},
          "Secret v1 with key 'token'")
    token_file = env.get("CELO2_CONTROL_TOKEN_FILE", "")
    vols = {v["name"]: v for v in worker_pod.get("volumes", [])}
    mounted = False
    for vm in worker.get("volumeMounts", []):
        v = vols.get(vm["name"], {})
        sec = v.get("secret")
        if not sec:
            continue
        check(sec.get("secretName") == secret["metadata"]["name"], "the worker mounts the token Secret by name")
        check(vm.get("readOnly") is True, "the token is mounted read-only")
        mode = sec.get("defaultMode")
        check(mode is not None and (mode & 0o077) == 0, f"the token file is private (defaultMode {mode!r})")
        paths = [it["path"] for it in sec.get("items", [])] or list(secret.get("stringData", {}))
        for p in paths:
            if os.path.join(vm["mountPath"], p) == token_file:
                mounted = True
    check(mounted, f"CELO2_CONTROL_TOKEN_FILE={token_file} is the mounted Secret's file")

    # The Service: selects worker 0 (MPI rank 0 under --map-by slot) on the control port.
    check(svc["apiVersion"] == "v1", "Service v1")
    sel = svc["spec"].get("selector", {})
    check(sel.get("training.kubeflow.org/job-name") == job["metadata"]["name"],
          "the Service selects this MPIJob's pods (training.kubeflow.org/job-name)")
    check(sel.get("training.kubeflow.org/job-role") == "worker", "the Service selects the workers")
    check(sel.get("training.kubeflow.org/replica-index") == "0",
          "the Service selects worker 0 only (a quoted \"0\": label values are strings)")
    check(any(p.get("targetPort") == ctl_port for p in svc["spec"].get("ports", [])),
          f"the Service targets the control port {ctl_port}")
    check(any(p.get("containerPort") == ctl_port for p in worker.get("ports", [])),
          "the worker declares the control port")
    check("--map-by" in argv and argv[argv.index("--map-by") + 1].startswith("slot"),
          "mpirun --map-by slot, so rank 0 is on worker 0")


if __name__ == "__main__":
    main(sys.argv[1])
    for f in failures:
        print("FAIL:", f)
    if failures:
        sys.exit(1)
    print("k8s manifests ok")
