"""The README's curl session, run literally against a server, and the checks CI makes of the image.

    python .ci/session.py readme URL [URL2]   # run the README's curl lines against URL (and URL2): same answers
    python .ci/session.py faces URL           # a face gallery: enroll a photo's face, recognise it
    python .ci/session.py again URL           # after a restart: both galleries still answer as before
    python .ci/session.py compose FILE        # docker-compose.yml names the image the Dockerfile builds

Each prints what it checked and exits 1 (with the reason) when a check fails.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_URL = "http://127.0.0.1:8000"


def readme_curls() -> list[str]:
    """The curl lines of the README's first session ("The same with curl"), as written there."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("The same with curl"):]
    block = block[block.index("```bash") + 7:]
    block = block[:block.index("```")]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("curl ")]


def run_curls(url: str) -> list[dict]:
    answers = []
    for line in readme_curls():
        done = subprocess.run(line.replace(README_URL, url) + " -sS --fail-with-body", shell=True, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            fail(f"{line}\n  -> exit {done.returncode}: {done.stdout}{done.stderr}")
        answers.append(json.loads(done.stdout))
    return answers


def same(a, b, path: str = "") -> None:
    """Equal JSON, numbers within 1e-3 (two installs may resolve different ONNX Runtime builds)."""
    if isinstance(a, float) or isinstance(b, float):
        if abs(a - b) > 1e-3:
            fail(f"{path}: {a} here, {b} there")
    elif isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            fail(f"{path}: keys {sorted(a)} here, {sorted(b)} there")
        for key in a:
            same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            fail(f"{path}: {len(a)} items here, {len(b)} there")
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif a != b:
        fail(f"{path}: {a!r} here, {b!r} there")


def readme(url: str, other: str | None = None) -> None:
    answers = run_curls(url)
    best = answers[-1]["results"][0]
    if best["matches"][0]["label"] != "cat" or best["unknown"]:
        fail(f"the README's recognise answered {best}, not cat")
    print(f"README session against {url}: {len(answers)} calls, cat recognised ({best['matches'][0]['score']:.4f})")
    if other:
        same(answers, run_curls(other))
        print(f"the same {len(answers)} answers from {other}")


def astronaut() -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def faces(url: str) -> None:
    import httpx

    created = httpx.post(f"{url}/v1/galleries", json={"name": "staff", "encoder": "face"}, timeout=60)
    enrolled = httpx.post(f"{url}/v1/galleries/staff/classes/eileen/examples", files={"files": astronaut()},
                          timeout=120)
    if created.status_code != 201 or enrolled.status_code != 201:
        fail(f"face gallery: create {created.status_code} {created.text}; "
             f"enroll {enrolled.status_code} {enrolled.text}")
    recognised(url)
    print(f"face gallery: enrolled and recognised ({enrolled.json()['faces']} face(s) in the photo)")
    created = httpx.post(f"{url}/v1/galleries", json={"name": "door", "encoder": "face:cnn"}, timeout=60)
    enrolled = httpx.post(f"{url}/v1/galleries/door/classes/eileen/examples", files={"files": astronaut()},
                          timeout=120)
    answer = httpx.post(f"{url}/v1/galleries/door/recognize", files={"files": astronaut()}, timeout=120).json()
    if created.status_code != 201 or enrolled.status_code != 201 or \
            [r["matches"][0]["label"] for r in answer.get("results", [])] != ["eileen"]:
        fail(f"face:cnn gallery: create {created.status_code} {created.text}; enroll {enrolled.status_code} "
             f"{enrolled.text}; recognize {answer}")
    print("face:cnn gallery (the CNN detector, no torch): her face alone found, enrolled and recognised")


def recognised(url: str) -> None:
    import httpx

    answer = httpx.post(f"{url}/v1/galleries/staff/recognize", files={"files": astronaut()}, timeout=120).json()
    labels = [r["matches"][0]["label"] for r in answer["results"] if not r["unknown"]]
    if "eileen" not in labels:
        fail(f"the enrolled face was not recognised: {answer}")


def again(url: str) -> None:
    import httpx

    cat = (ROOT / "samples" / "cat" / "2.jpg").read_bytes()
    answer = httpx.post(f"{url}/v1/galleries/pets/recognize", files={"files": cat}, timeout=120).json()
    classes = httpx.get(f"{url}/v1/galleries/pets/classes", timeout=30).json()
    labels = sorted(c["label"] for c in classes["classes"])
    if answer["results"][0]["matches"][0]["label"] != "cat" or labels != ["cat", "coffee", "rocket"]:
        fail(f"after the restart: classes {labels}, recognise {answer}")
    recognised(url)
    print(f"after the restart: classes {labels} kept, cat and the face recognised again")


def compose(file: str) -> None:
    import yaml

    spec = yaml.safe_load(Path(file).read_text())
    ours = {name: s for name, s in spec["services"].items() if s.get("build")}
    if not ours:
        fail(f"{file}: no service builds the Dockerfile")
    for name, service in ours.items():
        build = service["build"] if isinstance(service["build"], dict) else {"context": service["build"]}
        if build.get("context") != "." or build.get("dockerfile", "Dockerfile") != "Dockerfile":
            fail(f"{file}: service {name} builds {build}, not this directory's Dockerfile")
        if not re.fullmatch(r"fewshot(:latest)?", service.get("image", "")):
            fail(f"{file}: service {name} is tagged {service.get('image')!r}, not fewshot "
                 "(README: docker build -t fewshot)")
    for name, service in spec["services"].items():
        for needed in service.get("depends_on", {}):
            if needed not in spec["services"]:
                fail(f"{file}: service {name} depends on {needed}, which is not defined")
    print(f"{file}: services {sorted(spec['services'])} parse; {sorted(ours)} build ./Dockerfile as fewshot:latest")


def fail(reason: str) -> None:
    print(f"container check failed: {reason}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    commands = {"readme": readme, "faces": faces, "again": again, "compose": compose}
    if len(sys.argv) < 3 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
