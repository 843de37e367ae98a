"""Readable report plots: labels that do not overlap, distinct styles, panels per dataset, categorical axes."""

import io
import itertools

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np

from fedjaxpriv import report  # selects the Agg backend

STRENGTHS = ("eps=1", "eps=4", "eps=8", "bits=2", "bits=4", "alpha=1.0", "poisson batches", "sparsity=0.9",
             "sparsity=0.99", "fraction=0.01", "fraction=0.1", "eps=16", "bits=1", "alpha=0.2", "sparsity=0.5",
             "clip=1", "noise=2", "noise=0.5")


def _boxes(artists, renderer) -> np.ndarray:
    return np.array([[e.x0, e.y0, e.x1, e.y1] for e in (a.get_window_extent(renderer) for a in artists)])


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _assert_disjoint(boxes: np.ndarray, others: np.ndarray = None) -> None:
    if others is None:
        for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
            assert _overlap(a, b) == 0.0, (i, j, a, b)
    else:
        for i, a in enumerate(boxes):
            for j, b in enumerate(others):
                assert _overlap(a, b) == 0.0, (i, j, a, b)


def _point_boxes(ax, xs, ys, size_pt: float) -> np.ndarray:
    half = size_pt / 2.0 * ax.figure.dpi / 72.0
    points = ax.transData.transform(np.column_stack([xs, ys]))
    return np.column_stack([points - half, points + half])


def _leaders(ax) -> list:
    return [t for t in ax.texts if t.get_text() == "" and getattr(t, "arrow_patch", None) is not None]


def _assert_tied(ax, labels, xs, ys, renderer, marker_size: float) -> None:
    """Each label names its point (``xy``), and sits next to it or has a leader from the point to its box."""
    px = ax.figure.dpi / 72.0
    leaders = _leaders(ax)
    for label, x, y in zip(labels, xs, ys):
        assert label.xy == (x, y)
        point = ax.transData.transform((x, y))
        box = label.get_window_extent(renderer)
        nearest = np.clip(point, [box.x0, box.y0], [box.x1, box.y1])
        mine = [leader for leader in leaders if leader.xy == (x, y)]
        if not mine:
            assert np.hypot(*(nearest - point)) <= (marker_size / 2 + report.LEADER_FROM_PT) * px + 1.0
            continue
        ends = [point + np.asarray(leader.xyann) * px for leader in mine]  # the leaders' far ends
        assert any(box.x0 - 1 <= x1 <= box.x1 + 1 and box.y0 - 1 <= y1 <= box.y1 + 1 for x1, y1 in ends)


def _clustered(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return 0.5 + 0.04 * rng.standard_normal(count), 0.5 + 0.04 * rng.standard_normal(count)


def test_labels_of_clustered_points_are_disjoint_from_each_other_and_the_markers():
    xs, ys = _clustered(18)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(xs, ys, "o", markersize=6)
    ax.set(xlim=(0, 1), ylim=(0, 1))
    renderer = fig.canvas.get_renderer()
    labels = report.place_labels(ax, xs, ys, STRENGTHS, ["C0"] * 18, renderer, marker_size=6)
    assert [label.get_text() for label in labels] == list(STRENGTHS)  # every label, in input order
    boxes = _boxes(labels, renderer)
    _assert_disjoint(boxes)
    _assert_disjoint(boxes, _point_boxes(ax, xs, ys, 6))
    frame = ax.get_window_extent(renderer)
    assert (boxes[:, 0] >= frame.x0).all() and (boxes[:, 2] <= frame.x1).all()
    assert (boxes[:, 1] >= frame.y0).all() and (boxes[:, 3] <= frame.y1).all()
    _assert_tied(ax, labels, xs, ys, renderer, 6)
    assert _leaders(ax)  # a cluster this dense needs some
    fig.savefig(io.BytesIO(), format="png")  # drawing moves nothing
    np.testing.assert_allclose(_boxes(labels, renderer), boxes, atol=0.5)
    offsets = [label.xyann for label in labels]
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(xs, ys, "o", markersize=6)
    ax.set(xlim=(0, 1), ylim=(0, 1))
    again = report.place_labels(ax, xs, ys, STRENGTHS, ["C0"] * 18, marker_size=6)
    assert [label.xyann for label in again] == offsets  # deterministic
    plt.close(fig)


def test_labels_without_room_are_kept_with_leader_lines():
    xs, ys = np.full(12, 0.5), np.full(12, 0.5)
    texts = [f"a long strength label {i}" for i in range(12)]
    fig, ax = plt.subplots(figsize=(2.0, 1.5), dpi=100)
    ax.plot(xs, ys, "o")
    ax.set(xlim=(0, 1), ylim=(0, 1))
    renderer = fig.canvas.get_renderer()
    labels = report.place_labels(ax, xs, ys, texts, ["C1"] * 12, renderer)
    assert [label.get_text() for label in labels] == texts and all(label.get_visible() for label in labels)
    assert all(label.xy == (0.5, 0.5) for label in labels)
    assert len(_leaders(ax)) >= 1
    _assert_tied(ax, labels, xs, ys, renderer, 6.0)
    plt.close(fig)


def test_series_and_frontier_styles_are_distinct():
    pairs = [tuple(report.series_style(i).values()) for i in range(90)]
    assert len(set(pairs)) == 90
    families = ["pruning", "none"] + [f"defense{i}" for i in range(14)]
    styles = report.frontier_styles(families)
    assert list(styles) == families
    assert styles["none"]["marker"] == "*" and styles["none"]["color"] == "black"
    others = [(tuple(np.atleast_1d(s["color"])), s["marker"]) for f, s in styles.items() if f != "none"]
    assert len(set(others)) == len(others) == 15
    assert {s["marker"] for f, s in styles.items() if f != "none"} == set(report.MARKERS)
    assert len({s["color"] for f, s in styles.items() if f != "none"}) == 10  # all of tab10 before repeating


def _record(label: str, auc: float, accuracy: float, bytes_total: float, dataset: str = "digits",
            rounds: int = 10) -> dict:
    final = {"test_accuracy": accuracy, "attack/rmia/auc": auc, "attack/rmia/auc_low": auc - 0.02,
             "attack/rmia/auc_high": auc + 0.02, "attack/passive/auc": auc + 0.01}
    return {"label": label, "config_hash": label, "config": {"data": {"dataset": dataset}, "run": {"rounds": rounds}},
            "final": final, "history": [{"round": 1, "bytes_total": bytes_total}]}


def _clustered_records(dataset: str = "digits", rounds: int = 10) -> list[dict]:
    """16 runs of 8 defense families, most within a few hundredths of the undefended run."""
    runs = [("none", 0.66, 0.93, 1.6e7), ("pruning sparsity=0.5", 0.655, 0.925, 9e6),
            ("pruning sparsity=0.9", 0.65, 0.92, 1.7e6), ("quantization bits=2", 0.662, 0.93, 1.0e6),
            ("quantization bits=4", 0.664, 0.935, 2.0e6), ("topk fraction=0.01", 0.64, 0.915, 2.2e5),
            ("topk fraction=0.1", 0.65, 0.925, 2.2e6), ("mixup alpha=1.0", 0.67, 0.928, 1.6e7),
            ("mixup alpha=0.2", 0.668, 0.932, 1.6e7), ("poisson poisson batches", 0.66, 0.931, 1.6e7),
            ("dpsgd eps=1", 0.5, 0.1, 1.6e7), ("dpsgd eps=4", 0.52, 0.3, 1.6e7), ("dpsgd eps=8", 0.6, 0.85, 1.6e7),
            ("dpfedavg eps=4", 0.49, 0.06, 1.6e7), ("dpfedavg eps=8", 0.63, 0.9, 1.6e7),
            ("clipping clip=1", 0.658, 0.926, 1.6e7)]
    return [_record(*run, dataset=dataset, rounds=rounds) for run in runs]


def _families(ax) -> dict:
    """Family name -> (colour, marker) of the frontier curves drawn on ``ax``."""
    return {curve.get_label(): (matplotlib.colors.to_hex(curve.lines[0].get_color()), curve.lines[0].get_marker())
            for curve in ax.containers}


def test_frontier_on_clustered_records_has_distinct_styles_and_readable_labels():
    records = _clustered_records()
    fig = report.frontier_figure(records)
    axes = fig.axes
    assert len(axes) == 4  # (rmia, passive) x (accuracy, bytes)
    styles = _families(axes[0])
    assert set(styles) == {"none", "pruning", "quantization", "topk", "mixup", "poisson", "dpsgd", "dpfedavg",
                           "clipping"}
    assert len(set(styles.values())) == len(styles)
    assert styles["none"][1] == "*"
    renderer = fig.canvas.get_renderer()
    for ax in axes:
        assert _families(ax) == styles  # the same style for a family in every panel
        labels = [t for t in ax.texts if t.get_text()]
        assert len(labels) == len(records) - 1  # every strength; the undefended run has none
        boxes = _boxes(labels, renderer)
        _assert_disjoint(boxes)
        curves = {curve.get_label(): curve.lines[0] for curve in ax.containers}
        markers = np.concatenate([_point_boxes(ax, line.get_xdata(), line.get_ydata(), line.get_markersize())
                                  for line in curves.values()])
        _assert_disjoint(boxes, markers)
        for label in labels:  # in the colour of the family whose point it names
            family = next(f for f, line in curves.items()
                          if f != "none" and label.xy in zip(line.get_xdata(), line.get_ydata()))
            assert matplotlib.colors.to_hex(label.get_color()) == styles[family][0]
    plt.close(fig)


def test_frontier_gives_each_dataset_and_repeated_sweep_its_rows(tmp_path):
    records = _clustered_records("digits")[:6] + _clustered_records("cifar10")[:6]
    assert list(report.frontier_groups(records)) == ["dataset=digits", "dataset=cifar10"]
    fig = report.frontier_figure(records)
    assert len(fig.axes) == 8 and [ax.get_title(loc="left") for ax in fig.axes[::2]] == ["dataset=digits", "",
                                                                                         "dataset=cifar10", ""]
    plt.close(fig)
    longer = _clustered_records(rounds=10)[:4] + _clustered_records(rounds=40)[:4]
    assert list(report.frontier_groups(longer)) == ["rounds=10", "rounds=40"]
    assert report.frontier_groups(_clustered_records()) == {"": _clustered_records()}
    path = str(tmp_path / "frontier.png")
    assert report.plot_frontier(_clustered_records()[:3], path) == path
    with open(tmp_path / "frontier.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _swept(sampling: str, seed: int, noise: float, auc: float, dataset: str = "digits") -> dict:
    config = {"name": f"run{seed}", "data": {"dataset": dataset},
              "client": {"sampling": sampling, "dp_noise_multiplier": noise}, "run": {"seed": seed}}
    return {"label": f"{sampling},seed={seed}", "config_hash": f"{sampling}{seed}{noise}{dataset}", "config": config,
            "final": {"attack/passive/auc": auc, "test_accuracy": 0.5}, "history": [{"round": 1, "bytes_total": 1}]}


def test_categorical_knobs_get_categorical_axes(tmp_path, monkeypatch):
    records = [_swept("fixed", 0, 0.0, 0.8), _swept("poisson", 1, 1.0, 0.6), _swept("fixed", 2, 1.0, 0.65)]
    assert "run.seed" not in report.attack_strength_series(records)  # an identifier, not a strength
    # Noise 0 is the knob off: the undefended run is the reference, not a point; each family its own series.
    assert report.attack_strength_series(records)["client.dp_noise_multiplier"] == {
        "poisson": {"attack/passive/auc": [(1.0, 0.6)]}, "fixed": {"attack/passive/auc": [(1.0, 0.65)]}}
    assert report.undefended(records) == records[:1] and report.reference_levels(records) == {
        "attack/passive/auc": 0.8}
    categories = report.attack_category_series(records)
    assert set(categories) == {"client.sampling", "run.seed"}  # "name" is left out
    assert categories["client.sampling"] == {"attack/passive/auc": [("fixed", 0.8), ("poisson", 0.6),
                                                                    ("fixed", 0.65)]}
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append((path, fig)) or path)
    written = report.plot_attacks_vs_strength(records, str(tmp_path))
    assert set(written) == {"attacks_vs_client_dp_noise_multiplier", "attacks_vs_client_sampling",
                            "attacks_vs_run_seed"}
    by_name = {path.rsplit("/", 1)[-1]: fig for path, fig in figures}
    sampling = by_name["attacks_vs_client_sampling.png"].axes[-1]
    assert [t.get_text() for t in sampling.get_xticklabels()] == ["fixed", "poisson"]
    assert sorted(sampling.lines[0].get_xdata()) == [0, 0, 1]
    noise = by_name["attacks_vs_client_dp_noise_multiplier.png"].axes[-1]
    # The undefended run is a dashed reference line, each family a series of its own, nothing at noise 0 ("off").
    assert [t.get_text() for t in noise.get_legend().get_texts()] == ["undefended", "poisson", "fixed"]
    reference, poisson, fixed = noise.lines
    assert reference.get_linestyle() == "--" and list(reference.get_ydata()) == [0.8, 0.8]
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in (poisson, fixed)] == [
        ([1.0], [0.6]), ([1.0], [0.65])]
    for _, fig in figures:
        plt.close(fig)


def test_datasets_get_their_own_panels_and_series(tmp_path, monkeypatch):
    records = [_swept("fixed", 0, 0.0, 0.8), _swept("fixed", 1, 1.0, 0.6),
               _swept("fixed", 0, 0.0, 0.7, "cifar10"), _swept("fixed", 1, 1.0, 0.55, "cifar10")]
    for record in records:
        record["history"] = [{"round": 1, "bytes_total": 1, "test_accuracy": 0.5}]
    assert list(report.by_dataset(records)) == ["digits", "cifar10"]
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or path)
    report.plot_metric_vs_rounds(records, ["test_accuracy"], "test accuracy", str(tmp_path / "a.png"))
    report.plot_privacy_utility(records, str(tmp_path / "p.png"))
    report.plot_communication(records, str(tmp_path / "c.png"))
    for fig in figures:
        assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["dataset: digits", "dataset: cifar10"]
    figures.clear()
    report.plot_attacks_vs_strength(records, str(tmp_path))
    noise = next(fig for fig in figures if fig.axes[-1].get_xlabel() == "client.dp_noise_multiplier")
    assert [t.get_text() for t in noise.axes[0].get_legend().get_texts()] == [
        "digits: undefended", "cifar10: undefended", "digits: fixed", "cifar10: fixed"]
    for fig in figures:
        plt.close(fig)


def test_attack_bars_leave_room_for_every_run_label(tmp_path, monkeypatch):
    records = [{"label": f"pruning sparsity=0.{i:02d},seed={i}", "config": {"data": {"dataset": "digits"}},
                "final": {"attack/rmia/auc": 0.5 + i / 100}, "history": []} for i in range(40)]
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or path)
    report.plot_attacks(records, str(tmp_path / "attacks.png"))
    (fig,) = figures
    fig.tight_layout()
    ax = fig.axes[0]
    ticks = ax.get_xticklabels()
    assert len(ticks) == 40
    spacing = np.diff(ax.transData.transform(np.column_stack([np.arange(40), np.zeros(40)]))[:, 0])
    rotation = np.radians(ticks[0].get_rotation())
    height = ticks[0].get_fontsize() * fig.dpi / 72.0
    assert spacing.min() * np.sin(rotation) >= 1.2 * height  # parallel rotated labels do not touch
    plt.close(fig)


def _private(label: str, accuracy: float, **final) -> dict:
    history = [{"round": r, **{k: v * r / 3 for k, v in final.items() if not k.endswith("_basis")}} for r in (1, 2, 3)]
    return {"label": label, "config_hash": label, "config": {"data": {"dataset": "digits"}},
            "final": {"test_accuracy": accuracy, **final}, "history": history}


def test_privacy_levels_never_share_an_axis(tmp_path, monkeypatch):
    example_basis = ("example-level (one example of one client), against the server; neighbours: replace one "
                     "example; sampling: fixed-size batches; accountant: RDP; delta=1e-05")
    records = [_private("dpsgd", 0.8, epsilon_max=3.0, epsilon_basis=example_basis),
               _private("dpfedavg", 0.7, client_level_epsilon=40.0, client_level_epsilon_basis="client; b"),
               _private("dpfedavg2", 0.6, client_level_epsilon=20.0, client_level_epsilon_basis="client; c"),
               _private("none", 0.9), _private("mixed", 0.95, epsilon_max=float("inf"))]
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or path)
    report.plot_privacy_utility(records, str(tmp_path / "p.png"))
    report.plot_epsilon_vs_rounds(records, str(tmp_path / "e.png"))
    utility, rounds = figures
    example, client = (ax for ax in utility.axes if ax.get_xscale() == "log")
    assert example.get_xlabel().startswith("example-level") and "replace one example" in example.get_xlabel()
    assert client.get_xlabel().startswith("client-level") and "runs differ in basis" in client.get_xlabel()
    # Each panel plots its own level's epsilon; runs without DP at that level sit in a "no DP" strip beside it,
    # hollow, not on the epsilon axis.
    assert [[float(c.get_offsets()[0][0]) for c in ax.collections] for ax in (example, client)] == [[3.0], [40.0, 20.0]]
    for ax, without in ((example, [0.7, 0.6, 0.9, 0.95]), (client, [0.8, 0.9, 0.95])):
        (strip,) = ax.child_axes
        assert [t.get_text() for t in strip.get_xticklabels()] == ["no\nguarantee"]
        assert [float(c.get_offsets()[0][1]) for c in strip.collections] == without
        assert all(c.get_facecolors().size == 0 for c in strip.collections)
    assert [t.get_text() for t in client.get_legend().get_texts()] == ["dpsgd", "dpfedavg", "dpfedavg2", "none",
                                                                       "mixed"]
    example_rounds, client_rounds = rounds.axes
    assert example_rounds.get_ylabel() == "example-level epsilon" and "replace one" in example_rounds.get_xlabel()
    assert [list(line.get_ydata()) for line in example_rounds.lines] == [[1.0, 2.0, 3.0]]
    assert [line.get_ydata()[-1] for line in client_rounds.lines] == [40.0, 20.0]
    for fig in figures:
        plt.close(fig)
