"""Photos posted over HTTP while others search, with the server SIGKILLed midway and restarted on the same index.

``python -m alignsearch.bench.write_load [--photos 1000] [--json FILE]`` builds a small index (16 photos) in a
temporary folder, starts ``alignsearch serve`` on 127.0.0.1 with an API key as a real subprocess, and has
``--clients`` (8) threads POST ``--photos`` distinct small JPEGs (96-200 px, made from the Flickr8k-800 photos
when ``$ALIGNSEARCH_DATASET`` has them, synthetic otherwise; each with a caption and fields) while
``--searchers`` (4) threads run text searches without pause. When ``--kill-at`` (half) of the photos are
acknowledged the server gets SIGKILL; it is restarted on the same index and the clients go on. An upload whose
request was cut by the kill is not sent again: it must be either fully in the index or not at all.

What it reports (JSON): answers by status (5xx counted apart; a refused connection while the server is down is
not an answer), acknowledged photos lost (a 201 and afterwards not fully in the index), cut photos fully
present / fully absent / half there, where "fully in the index" is checked on the index itself after the
server stops: a live SQLite row, a vector in the global store and an item in the local store for that row, its
caption, and its file under the images folder; "fully absent" is none of these. Also uploads per second, the
search latency percentiles under the write load, the time from a 201 to the photo coming back from a filtered
search (a sample), the groups the writer committed, ``alignsearch index verify``, and the load average.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw

from .cli import DEFAULT_DATASET, emit_report

KEY = "write-load-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SEED_PHOTOS = 16
SYNTHETIC_CAPTIONS = ("a red square on a blue field", "a green circle in the sky", "two yellow stripes",
                      "a dark shape on a white wall", "an orange ball on the grass")


@dataclass
class Photo:
    n: int
    data: bytes
    caption: str
    image_id: str = ""

    def __post_init__(self) -> None:
        from alignsearch.service.writes import upload_id

        self.image_id = upload_id(self.data, "JPEG")


def _jpeg(image: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _marked(image: Image.Image, n: int) -> Image.Image:
    """``image`` with ``n`` written in a row of 8x8 blocks (a photo's bytes are distinct from every other's)."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    for bit in range(12):
        shade = 255 if (n >> bit) & 1 else 0
        draw.rectangle([bit * 8, 0, bit * 8 + 7, 7], fill=(shade, shade, shade))
    return image


def dataset_photos(dataset: Path | None) -> list[tuple[Image.Image, str]]:
    """(photo, one of its captions) from the dataset's ``captions.csv`` and ``images/`` (read, never copied into
    the repository); [] when there is none."""
    if dataset is None or not (dataset / "captions.csv").is_file():
        return []
    first: dict[str, str] = {}
    with open(dataset / "captions.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            first.setdefault(row["image"], row["caption"].strip())
    out = []
    for name, caption in sorted(first.items()):
        path = dataset / "images" / name
        if path.is_file():
            with Image.open(path) as im:
                im.draft("RGB", (400, 400))
                out.append((im.convert("RGB"), caption))
    return out


def synthetic_photo(rng: random.Random) -> tuple[Image.Image, str]:
    image = Image.new("RGB", (200, 160), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.randrange(180), rng.randrange(140)
        draw.ellipse([x, y, x + rng.randrange(20, 80), y + rng.randrange(20, 80)],
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    return image, rng.choice(SYNTHETIC_CAPTIONS)


def make_photos(count: int, sources: list[tuple[Image.Image, str]], seed: int = 0) -> list[Photo]:
    """``count`` distinct small JPEGs (96-200 px on the long side), each with a caption."""
    rng = random.Random(seed)
    photos = []
    for n in range(count):
        image, caption = sources[n % len(sources)] if sources else synthetic_photo(rng)
        side = rng.randrange(96, 201)
        small = image.copy()
        small.thumbnail((side, side))
        photos.append(Photo(n, _jpeg(_marked(small, n)), caption))
    return photos


def build_seed_index(work: Path, sources: list[tuple[Image.Image, str]]) -> Path:
    """A small index of :data:`SEED_PHOTOS` photos (the last of ``sources``, or synthetic ones) in ``work``."""
    images = work / "images"
    images.mkdir(parents=True)
    rng = random.Random(99)
    seeds = sources[-SEED_PHOTOS:] if len(sources) >= SEED_PHOTOS else [synthetic_photo(rng) for _ in range(SEED_PHOTOS)]
    for i, (image, _) in enumerate(seeds):
        (images / f"seed{i:02d}.jpg").write_bytes(_jpeg(image))
    subprocess.run([sys.executable, "-m", "alignsearch", "index", "build", "--images", str(images),
                    "--out", str(work / "index"), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return work / "index"


@dataclass
class Load:
    """What the client threads share and record."""

    photos: list[Photo]
    kill_after: int  # acknowledged photos before the kill
    queue: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    up: threading.Event = field(default_factory=threading.Event)
    writing: threading.Event = field(default_factory=threading.Event)  # set while uploads remain
    kill_now: threading.Event = field(default_factory=threading.Event)
    url: str = ""
    acked: dict[int, float] = field(default_factory=dict)  # photo -> when its 201 came (monotonic)
    created: dict[int, bool] = field(default_factory=dict)
    cut: set[int] = field(default_factory=set)  # requests in flight when the server died
    statuses: Counter = field(default_factory=Counter)  # "POST /images 201", ...
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)  # 4xx answers (the first few)
    search_ms: list[float] = field(default_factory=list)
    search_cut: int = 0
    visible_ms: list[float] = field(default_factory=list)  # 201 -> found by a filtered search
    not_visible: list[int] = field(default_factory=list)

    def next_photo(self) -> int | None:
        with self.lock:
            return self.queue.pop(0) if self.queue else None

    def answer(self, route: str, r: httpx.Response) -> None:
        with self.lock:
            self.statuses[f"{route} {r.status_code}"] += 1
            if r.status_code >= 500:
                self.server_errors.append({"route": route, "status": r.status_code, "detail": r.text[:200]})
            elif r.status_code >= 400 and len(self.refusals) < 10:
                self.refusals.append({"route": route, "status": r.status_code, "detail": r.text[:200]})


def _found(client: httpx.Client, url: str, photo: Photo) -> bool:
    r = client.post(f"{url}/search/text", headers=AUTH, json={
        "query": photo.caption, "k": 1, "filter": {"must": [{"key": "load_n", "match": {"value": photo.n}}]}})
    return r.status_code == 200 and [h["id"] for h in r.json()["results"]] == [photo.image_id]


def uploader(load: Load, sample_every: int) -> None:
    with httpx.Client(timeout=600) as client:
        n = load.next_photo()
        while n is not None:
            load.up.wait()
            url, photo = load.url, load.photos[n]
            try:
                r = client.post(f"{url}/images", headers=AUTH,
                                files={"file": (f"p{n}.jpg", photo.data, "image/jpeg")},
                                data={"captions": json.dumps([photo.caption]),
                                      "metadata": json.dumps({"load_n": photo.n, "album": "write-load"})})
            except httpx.ConnectError:  # the server is down: never sent, so sent again once it is up
                time.sleep(0.1)
                continue
            except httpx.TransportError:  # sent, and the server died before answering
                with load.lock:
                    load.cut.add(n)
                n = load.next_photo()
                continue
            load.answer("POST /images", r)
            if r.status_code in (200, 201):
                with load.lock:
                    load.acked[n], load.created[n] = time.monotonic(), r.status_code == 201
                    if len(load.acked) >= load.kill_after:
                        load.kill_now.set()
                if n % sample_every == 0:  # how long until a search finds it
                    start = load.acked[n]
                    try:
                        while not _found(client, url, photo):
                            if time.monotonic() - start > 10:
                                load.not_visible.append(n)
                                break
                            time.sleep(0.05)
                        else:
                            load.visible_ms.append((time.monotonic() - start) * 1000)
                    except httpx.TransportError:
                        pass  # the server was killed meanwhile: no sample
            n = load.next_photo()


def searcher(load: Load, queries: list[str], seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=600) as client:
        while load.writing.is_set():
            load.up.wait()
            start = time.monotonic()
            try:
                r = client.post(f"{load.url}/search/text", headers=AUTH, json={"query": rng.choice(queries), "k": 10})
            except httpx.ConnectError:
                time.sleep(0.1)
                continue
            except httpx.TransportError:
                with load.lock:
                    load.search_cut += 1
                continue
            load.answer("POST /search/text", r)
            if r.status_code == 200:
                with load.lock:
                    load.search_ms.append((time.monotonic() - start) * 1000)


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    a = np.array(values)
    return {"count": len(values), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p90_ms": round(float(np.percentile(a, 90)), 1), "p99_ms": round(float(np.percentile(a, 99)), 1),
            "max_ms": round(float(a.max()), 1)}


def index_state(folder: Path, photos: list[Photo]) -> dict[int, dict[str, bool]]:
    """For each photo, what of it the index holds: a live SQLite row, a vector in the global store, an item in
    the local store, a caption, its file under the images folder."""
    from alignsearch.indexer import layout
    from alignsearch.indexer.index import Index

    index = Index(folder, use_gpu=False)
    try:
        images = index.images
        held = images.index.ids()
        held = set(held.tolist()) if held is not None else set(range(images.index.count()))
        rows = {r["id"]: r["row"] for r in index.conn.execute(
            "SELECT id, row FROM images WHERE deleted = 0 AND id LIKE 'uploads/%'")}
        captioned = {r[0] for r in index.conn.execute(
            "SELECT DISTINCT image_id FROM captions WHERE deleted = 0 AND image_id LIKE 'uploads/%'")}
        root = Path(layout.real_path(index.images_root))
        return {p.n: {"row": p.image_id in rows,
                      "vector": p.image_id in rows and rows[p.image_id] in held,
                      "regions": p.image_id in rows and rows[p.image_id] < len(images.store),
                      "caption": p.image_id in captioned,
                      "file": (root / p.image_id).is_file()} for p in photos}
    finally:
        index.conn.close()


def _tracebacks(log: str, most: int = 2) -> list[str]:
    """The first ``most`` "unexpected error" or failed group commit entries of a server's output, each with its
    traceback (a commit that failed and was committed again is a finding too, though no request saw it)."""
    out, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if ("unexpected error" in line or "failed to commit" in line) and len(out) < most:
            block = [line]
            for follow in lines[i + 1:i + 60]:
                block.append(follow)
                if follow and not follow.startswith((" ", "Traceback", "During", "The above")) and len(block) > 2:
                    break
            out.append("\n".join(block))
    return out


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(photos: int = 1000, clients: int = 8, searchers: int = 4, kill_at: float = 0.5, work: Path | None = None,
        dataset: Path | None = DEFAULT_DATASET, batch_ms: float | None = None, batch_max: int | None = None,
        sample_every: int = 10, ready_timeout: float = 900) -> dict[str, Any]:
    """The whole measurement (see the module's doc); returns the report."""
    from alignsearch.service.launch import start

    with tempfile.TemporaryDirectory(prefix="alignsearch-write-load-") as tmp:
        work = Path(work or tmp)
        sources = dataset_photos(dataset)
        made = make_photos(photos, sources)
        t0 = time.monotonic()
        folder = build_seed_index(work, sources)
        build_s = time.monotonic() - t0
        env = {"ALIGNSEARCH_API_KEY": KEY}
        if batch_ms is not None:
            env["ALIGNSEARCH_WRITE_BATCH_MS"] = str(batch_ms)
        if batch_max is not None:
            env["ALIGNSEARCH_WRITE_BATCH_MAX"] = str(batch_max)
        load = Load(made, kill_after=max(1, int(photos * kill_at)) if kill_at > 0 else photos + 1,
                    queue=list(range(photos)))
        loads = {"before": _load()}
        server = start(folder, env=env, ready_timeout=ready_timeout)
        port = server.port
        load.url = server.url
        queries = sorted({p.caption for p in made}) or list(SYNTHETIC_CAPTIONS)
        threads = [threading.Thread(target=uploader, args=(load, sample_every), daemon=True) for _ in range(clients)]
        threads += [threading.Thread(target=searcher, args=(load, queries, i), daemon=True) for i in range(searchers)]
        load.writing.set()
        load.up.set()
        start_t = time.monotonic()
        for t in threads:
            t.start()
        kill: dict[str, Any] = {}
        killed_log = ""
        during: list[list[float]] = []
        next_load = start_t
        try:
            while any(t.is_alive() for t in threads[:clients]):
                if load.kill_now.is_set() and not kill:
                    load.up.clear()
                    kill["acked_before"] = len(load.acked)
                    kill["at_s"] = round(time.monotonic() - start_t, 2)
                    server.kill()
                    killed_log = server.output()
                    server.stop()
                    restart = time.monotonic()
                    server = start(folder, env=env, ready_timeout=ready_timeout, port=port)
                    kill["restart_s"] = round(time.monotonic() - restart, 2)
                    kill["server_log_tail"] = killed_log[-1500:]
                    load.up.set()
                if time.monotonic() >= next_load:  # every 10 s (not while a restart blocks this loop)
                    during.append(_load())
                    next_load = time.monotonic() + 10
                time.sleep(0.05)
            write_s = time.monotonic() - start_t
            load.writing.clear()
            for t in threads:
                t.join(timeout=600)
            listed, metrics, died = Counter(), "", None
            with httpx.Client(timeout=600) as client:  # every acknowledged photo is served by id
                try:
                    for n in load.acked:
                        r = client.get(f"{server.url}/images/{made[n].image_id}", headers=AUTH)
                        listed[r.status_code == 200 and r.content == made[n].data] += 1
                    metrics = client.get(f"{server.url}/metrics", headers=AUTH).text
                except httpx.TransportError as exc:  # reported (with the server's output), the index still checked
                    died = f"{type(exc).__name__}; server exit status {server.proc.poll()}"
        except BaseException:
            print(f"the server's output:\n{server.output()[-4000:]}", file=sys.stderr)
            raise
        finally:
            load.writing.clear()
            load.up.set()
            server_log = server.output()
            server.stop()
        loads["during"], loads["after"] = during, _load()
        state = index_state(folder, made)
        verify = subprocess.run([sys.executable, "-m", "alignsearch", "index", "verify", str(folder)],
                                capture_output=True, text=True)
        full = {n for n, s in state.items() if all(s.values())}
        absent = {n for n, s in state.items() if not any(s.values())}
        half = {n: s for n, s in state.items() if n not in full and n not in absent}
        lost = sorted(n for n in load.acked if n not in full)
        never_sent = [n for n in range(photos) if n not in load.acked and n not in load.cut]
        five = sum(v for k, v in load.statuses.items() if int(k.rsplit(" ", 1)[1]) >= 500)
        down_s = kill.get("restart_s", 0.0)
        report = {
            "photos": photos, "clients": clients, "searchers": searchers, "kill_at": kill_at,
            "source": "flickr8k-800 photos, resized and marked" if sources else "synthetic",
            "server_env": {k: v for k, v in env.items() if k != "ALIGNSEARCH_API_KEY"},
            "seed_index_build_s": round(build_s, 1),
            "statuses": dict(sorted(load.statuses.items())), "server_errors_5xx": five,
            "server_error_samples": load.server_errors[:10], "refusal_samples": load.refusals,
            "acknowledged": len(load.acked), "acknowledged_new": sum(load.created.values()),
            "lost_acknowledged": len(lost), "lost_sample": lost[:10],
            "acknowledged_served_by_id": listed[True], "acknowledged_not_served": listed[False],
            "cut_by_kill": {"count": len(load.cut), "fully_present": len(load.cut & full),
                            "fully_absent": len(load.cut & absent), "half_there": len(load.cut & set(half))},
            "half_there_any": len(half), "half_there_sample": {str(n): s for n, s in list(half.items())[:10]},
            "not_acknowledged_but_present": len(full - set(load.acked)),
            "never_sent": len(never_sent),
            "kill": {k: v for k, v in kill.items() if k != "server_log_tail"},
            "write_phase_s": round(write_s, 1),
            "uploads_per_s": round(len(load.acked) / write_s, 2),
            "uploads_per_s_excluding_restart": round(len(load.acked) / max(1e-9, write_s - down_s), 2),
            "search_under_write_load": percentiles(load.search_ms), "searches_cut_by_kill": load.search_cut,
            "ack_to_searchable": {**percentiles(load.visible_ms), "not_found_in_10s": len(load.not_visible)},
            "writer_groups": _groups(metrics), "server_failed_after_writes": died,
            "index_verify": {"rc": verify.returncode, "out": (verify.stdout + verify.stderr).strip()[-500:]},
            "load_average": loads, "cpus": os.cpu_count(),
            "server_log_tail": server_log[-1000:],
            "server_tracebacks": _tracebacks(killed_log + server_log),
            "commits_failed_and_retried": (killed_log + server_log).count("committing it again"),
        }
        return report


def _groups(metrics: str) -> dict[str, float]:
    """The writer's groups from ``/metrics`` (since the restart): updates committed and uploads in them."""
    out = {}
    for line in metrics.splitlines():
        for suffix, name in (("_count", "updates"), ("_sum", "uploads")):
            if line.startswith(f"alignsearch_write_group_size{suffix} "):
                out[name] = float(line.split()[1])
    if out.get("updates"):
        out["mean_group_size"] = round(out["uploads"] / out["updates"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alignsearch.bench.write_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=1000, help="photos to post (200: a run of a few minutes)")
    p.add_argument("--clients", type=int, default=8, help="threads posting photos")
    p.add_argument("--searchers", type=int, default=4, help="threads searching meanwhile")
    p.add_argument("--kill-at", type=float, default=0.5,
                   help="SIGKILL the server when this share of the photos is acknowledged (0: no kill)")
    p.add_argument("--batch-ms", type=float, default=None, help="the server's upload grouping window (its default)")
    p.add_argument("--batch-max", type=int, default=None, help="most uploads in one update (1: one update each)")
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="photos to make the uploads from")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)
    if args.photos < 1 or args.clients < 1 or args.searchers < 0 or not 0 <= args.kill_at < 1:
        p.error("--photos and --clients must be >= 1, --searchers >= 0, --kill-at in [0, 1)")
    report = run(args.photos, args.clients, args.searchers, args.kill_at, dataset=args.dataset,
                 batch_ms=args.batch_ms, batch_max=args.batch_max)
    emit_report(report, args.json)
    ok = report["server_errors_5xx"] == 0 and report["lost_acknowledged"] == 0 and report["half_there_any"] == 0 \
        and report["index_verify"]["rc"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
