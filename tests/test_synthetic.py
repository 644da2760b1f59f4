"""Synthetic visual-reasoning data: scene ground truth, task answers, mixture, metrics."""

from __future__ import annotations

import hashlib
import string

import numpy as np
import pytest
from PIL import Image, features
from scipy import ndimage

from apriel_jax.data.synthetic import (
    CATEGORIES,
    COLORS,
    DEFAULT_TASKS,
    ColorTask,
    CountingTask,
    DetectionTask,
    ImageFolderSource,
    MatchingTask,
    ReconstructionTask,
    ShapeTask,
    TaskMixture,
    box_iou,
    choice_accuracy,
    counting_accuracy,
    detection_score,
    label_accuracy,
    parse_box,
    parse_choice,
    parse_count,
    parse_label,
    parse_presence,
    render_grid_scene,
    render_scene,
)
from apriel_jax.data.synthetic.shapes import MIN_GAP
from apriel_jax.data.synthetic.tasks import dominant_color, normalize_box

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _scene(seed, **kw):
    kw.setdefault("num_objects", (4, 12))
    kw.setdefault("min_size", 12)
    kw.setdefault("max_size", 40)
    return render_scene(np.random.default_rng(seed), **kw)


def _image(sample) -> Image.Image:
    return sample["messages"][0]["content"][0]["image"]


def _digest(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


# ---------------------------------------------------------------- scenes


@pytest.mark.parametrize("noise", [0.0, 0.8])
def test_annotations_match_pixels(noise):
    """Each colour's exact-match mask splits into one 8-connected component per annotated object
    of that colour, with the annotated tight box; the noisy background never matches a colour."""
    for seed in range(8):
        image, anns = _scene(seed, noise=noise)
        pixels = np.asarray(image)
        for name, rgb in COLORS.items():
            labels, n = ndimage.label(np.all(pixels == rgb, axis=-1), structure=EIGHT_CONNECTED)
            found = sorted(
                (int(sl[1].start), int(sl[0].start), int(sl[1].stop), int(sl[0].stop))
                for sl in ndimage.find_objects(labels)
            )
            assert found == sorted(a.box for a in anns if a.color == name), (seed, name)


def test_no_overlap_and_in_bounds():
    for seed in range(20):
        image, anns = _scene(seed, num_objects=(10, 20), size=(192, 256))
        w, h = image.size
        assert (w, h) == (256, 192)
        for i, a in enumerate(anns):
            assert 0 <= a.box[0] < a.box[2] <= w and 0 <= a.box[1] < a.box[3] <= h
            for b in anns[i + 1:]:
                apart = (a.box[2] + MIN_GAP <= b.box[0] or b.box[2] + MIN_GAP <= a.box[0]
                         or a.box[3] + MIN_GAP <= b.box[1] or b.box[3] + MIN_GAP <= a.box[1])
                assert apart, (seed, a, b)


def test_shape_categories_have_their_fill_ratio():
    # area / box area identifies the drawn shape kind (catches a category/shape mix-up)
    ranges = {"square": (0.95, 1.0), "circle": (0.72, 0.85), "triangle": (0.4, 0.6), "diamond": (0.4, 0.6),
              "hexagon": (0.6, 0.8), "star": (0.2, 0.45)}
    for category, (lo, hi) in ranges.items():
        image, anns = _scene(3, categories=(category,), min_size=30, max_size=50, noise=0.5)
        pixels = np.asarray(image)
        for a in anns:
            x0, y0, x1, y1 = a.box
            ratio = np.all(pixels[y0:y1, x0:x1] == COLORS[a.color], axis=-1).mean()
            assert lo <= ratio <= hi, (category, ratio)


def test_render_is_deterministic_and_seed_dependent():
    a, b, c = _scene(5, noise=0.5), _scene(5, noise=0.5), _scene(6, noise=0.5)
    assert _digest(a[0]) == _digest(b[0]) and a[1] == b[1]
    assert _digest(a[0]) != _digest(c[0])


def test_overlap_allowed_and_crowded_scene_truncates():
    _, anns = _scene(0, num_objects=(30, 30), min_size=60, max_size=60, size=(128, 128), max_attempts=20)
    assert 1 <= len(anns) < 30  # only what fits is drawn, and annotated
    _, anns = _scene(0, num_objects=(30, 30), min_size=60, max_size=60, size=(128, 128), allow_overlap=True)
    assert len(anns) == 30


def test_scene_argument_errors():
    with pytest.raises(ValueError):
        _scene(0, colors=("mauve",))
    with pytest.raises(ValueError):
        _scene(0, categories=("blob",))
    with pytest.raises(ValueError):
        _scene(0, min_size=300, max_size=300)


# ---------------------------------------------------------------- tasks


def test_counting_answer_matches_annotations():
    kinds = set()
    for seed in range(40):
        image, anns = _scene(seed)
        s = CountingTask(0.5)(np.random.default_rng(seed), image, anns)
        ans = s["answer"]
        expected = sum(1 for a in anns if ans["category"] in (None, a.category) and ans["color"] in (None, a.color))
        assert ans["count"] == expected and s["messages"][1]["content"] == str(expected)
        question = s["messages"][0]["content"][1]["text"]
        for word in (ans["color"], ans["category"]):
            assert word is None or word in question
        kinds.add((ans["category"] is None, ans["color"] is None))
        assert s["task"] == "counting" and _image(s) is image
    assert len(kinds) == 4  # total, per category, per colour, both


def test_grid_scene_puts_one_object_in_each_chosen_cell():
    for seed in range(20):
        for count, fill, jitter, noise in ((seed % 5, 0.875, 0.0, 0.0), (4, 0.5, 1.0, 0.5)):
            image, anns = render_grid_scene(np.random.default_rng(seed), size=(32, 32), grid=2, count=count,
                                            fill=fill, jitter=jitter, noise=noise)
            pixels = np.asarray(image)
            cells = set()
            for a in anns:
                x0, y0, x1, y1 = a.box
                cell = (x0 // 16, y0 // 16)
                assert cell == ((x1 - 1) // 16, (y1 - 1) // 16), (seed, a)  # inside one 16 px cell
                assert x0 % 16 >= 1 and y0 % 16 >= 1 and x1 % 16 in range(1, 16) and y1 % 16 in range(1, 16)
                cells.add(cell)
                drawn = np.all(pixels == COLORS[a.color], axis=-1)
                cell_pixels = drawn[cell[1] * 16:cell[1] * 16 + 16, cell[0] * 16:cell[0] * 16 + 16]
                assert drawn[y0:y1, x0:x1].sum() == cell_pixels.sum() > 0  # nothing of it outside its box
            assert len(anns) == len(cells) == count, (seed, anns)
    with pytest.raises(ValueError):
        render_grid_scene(np.random.default_rng(0), size=(32, 32), grid=2, count=5)
    with pytest.raises(ValueError):  # 2 px cells leave no room for an object 2 px from its neighbours
        render_grid_scene(np.random.default_rng(0), size=(4, 4), grid=2, count=2)


def test_easiest_counting_is_a_balanced_grid_of_one_colour():
    """Difficulty 0: 1-4 shapes of one colour, one per 16 px cell of a 32 px image (the patches of the demo's
    vision encoder), asked for the total; the answers are balanced so no count is a safe guess."""
    task = CountingTask(0.0, size=(32, 32))
    samples = [task(np.random.default_rng(seed)) for seed in range(200)]
    counts = [s["answer"]["count"] for s in samples]
    assert set(counts) == {1, 2, 3, 4} and max(counts.count(c) for c in range(1, 5)) <= 0.35 * len(counts)
    for s in samples[:40]:
        pixels = np.asarray(_image(s))
        assert s["answer"]["category"] is None and s["answer"]["color"] is None
        assert "How many shapes" in s["messages"][0]["content"][1]["text"] or "Count the shapes" in \
            s["messages"][0]["content"][1]["text"]
        on = [np.all(pixels[r:r + 16, c:c + 16] == COLORS["red"], axis=-1).any()
              for r in (0, 16) for c in (0, 16)]
        assert sum(on) == s["answer"]["count"] == int(s["messages"][1]["content"])
        objects = {tuple(p) for p in pixels.reshape(-1, 3)} & {tuple(c) for c in COLORS.values()}
        assert objects == {COLORS["red"]}
    # the grid regime gets harder towards GRID_DIFFICULTY: more colours, smaller shapes anywhere in the cell
    harder = [CountingTask(0.2, size=(32, 32))(np.random.default_rng(seed)) for seed in range(40)]
    colours = {a for s in harder for a in {tuple(p) for p in np.asarray(_image(s)).reshape(-1, 3)}} & \
        {tuple(c) for c in COLORS.values()}
    assert len(colours) > 4
    # from GRID_DIFFICULTY on, questions may also filter by shape and colour
    free = [CountingTask(CountingTask.GRID_DIFFICULTY)(np.random.default_rng(seed))["answer"] for seed in range(20)]
    assert {a["category"] is None and a["color"] is None for a in free} == {True, False}


def test_difficulty_changes_scenes():
    def stats(d):
        counts, areas = [], []
        for seed in range(40):
            rng = np.random.default_rng(seed)
            _, objs = render_scene(rng, **CountingTask(d).scene_kwargs(rng))
            counts.append(len(objs))
            areas.extend(a.area for a in objs)
        return np.mean(counts), np.mean(areas)

    # free scenes (from GRID_DIFFICULTY on; below it counting uses 2 x 2 grids of at most 4 objects)
    easy, hard = stats(CountingTask.GRID_DIFFICULTY), stats(1.0)
    assert hard[0] > easy[0] + 3  # more objects
    assert hard[1] < easy[1] / 2  # smaller objects
    assert MatchingTask(0.0).num_candidates < MatchingTask(1.0).num_candidates
    assert CountingTask(0.7)(np.random.default_rng(0))["difficulty"] == 0.7


def test_detection_answer_matches_annotations():
    seen = set()
    for seed in range(40):
        image, anns = _scene(seed, colors=("red", "blue", "green"), categories=("circle", "square", "star"))
        s = DetectionTask(0.5)(np.random.default_rng(seed), image, anns)
        ans, text = s["answer"], s["messages"][1]["content"]
        matches = [a for a in anns if (a.color, a.category) == (ans["color"], ans["category"])]
        assert f"{ans['color']} {ans['category']}" in s["messages"][0]["content"][1]["text"]
        if ans["present"]:
            assert len(matches) == 1 and ans["box_pixels"] == matches[0].box
            assert ans["box"] == normalize_box(matches[0].box, *image.size)
            assert parse_box(text) == tuple(float(v) for v in ans["box"]) and parse_presence(text) is True
        else:
            assert not matches and text == "No." and parse_presence(text) is False
        seen.add(ans["present"])
    assert seen == {True, False}


def test_reconstruction_hides_exactly_one_object():
    for seed in range(20):
        image, anns = _scene(seed, noise=0.5)
        s = ReconstructionTask(0.5)(np.random.default_rng(seed), image, anns)
        ans, masked = s["answer"], np.asarray(_image(s))
        x0, y0, x1, y1 = ans["mask_box"]
        hidden = [a for a in anns if a.box[0] < x1 and x0 < a.box[2] and a.box[1] < y1 and y0 < a.box[3]]
        assert len(hidden) == 1
        target = hidden[0]
        assert (ans["color"], ans["category"]) == (target.color, target.category)
        assert s["messages"][1]["content"] == f"A {target.color} {target.category}."
        assert not np.all(masked[y0:y1, x0:x1] == COLORS[target.color], axis=-1).any()
        outside = np.ones(masked.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(masked[outside], np.asarray(image)[outside])  # nothing else touched


def test_reconstruction_colour_variant_on_real_image():
    pixels = np.zeros((120, 160, 3), np.uint8)
    pixels[:, :80] = (30, 160, 40)  # green left half
    pixels[:, 80:] = (30, 50, 200)  # blue right half
    image = Image.fromarray(pixels)
    assert dominant_color(pixels[:, :80]) == ("green", 1.0)
    for seed in range(10):
        s = ReconstructionTask(0.0)(np.random.default_rng(seed), image)
        ans = s["answer"]
        x0, y0, x1, y1 = ans["mask_box"]
        assert ans["kind"] == "color" and ans["fraction"] >= 0.7
        assert (ans["color"], ans["fraction"]) == dominant_color(pixels[y0:y1, x0:x1])
        assert s["messages"][1]["content"] == f"Mostly {ans['color']}."


def _tiles(sample):
    grid, ans = _image(sample), sample["answer"]
    ref = np.asarray(grid.crop(ans["reference_cell"]), np.float32)
    tiles = []
    for cell, mirrored in zip(ans["cells"], ans["mirrored"]):
        tile = np.asarray(grid.crop(cell), np.float32)
        tiles.append(tile[:, ::-1] if mirrored else tile)  # undo the recorded mirror
    return ref, tiles


def _coarse(tile: np.ndarray) -> np.ndarray:
    """8x8 thumbnail with per-channel standardisation: insensitive to the small shift/rescale and
    the colour jitter applied to the correct candidate, and to background noise."""
    x = np.asarray(Image.fromarray(tile.astype(np.uint8)).resize((8, 8), Image.BOX), np.float32)
    return (x - x.mean((0, 1))) / (x.std((0, 1)) + 1e-3)


def test_matching_easy_correct_tile_is_the_reference():
    for seed in range(10):
        s = MatchingTask(0.0)(np.random.default_rng(seed))
        ans = s["answer"]
        ref, tiles = _tiles(s)
        assert s["messages"][1]["content"] == ans["letter"] == string.ascii_uppercase[ans["index"]]
        for i, tile in enumerate(tiles):
            assert (np.abs(tile - ref).max() == 0) == (i == ans["index"])


def test_matching_label_points_at_the_anchor_region():
    hits = 0
    for seed in range(20):
        s = MatchingTask(0.6)(np.random.default_rng(seed))
        ans = s["answer"]
        assert len(ans["cells"]) == ans["num_candidates"] == 5
        for i, box in enumerate(ans["candidate_boxes"]):
            iou = box_iou(box, ans["anchor_box"])
            assert iou > 0.3 if i == ans["index"] else iou < 0.1
        ref, tiles = _tiles(s)
        hits += int(np.argmin([np.abs(_coarse(t) - _coarse(ref)).mean() for t in tiles])) == ans["index"]
    assert hits >= 19  # the labelled tile is (almost always) also the closest in coarse appearance


# ---------------------------------------------------------------- mixture


def test_mixture_random_access_and_determinism():
    m = TaskMixture(seed=3, length=40)
    again = TaskMixture(seed=3, length=40)
    assert len(m) == 40
    order = [17, 2, 39, 2]
    for i in order:
        a, b = m[i], again[i]
        assert a["task"] == b["task"] and _digest(_image(a)) == _digest(_image(b))
        assert a["messages"][1]["content"] == b["messages"][1]["content"]
    assert _digest(_image(m[-1])) == _digest(_image(m[39]))
    with pytest.raises(IndexError):
        m[40]
    assert {m[i]["task"] for i in range(40)} == {"counting", "detection", "matching", "reconstruction"}


def test_mixture_splits_are_disjoint():
    train = {_digest(_image(s)) for s in TaskMixture(seed=0, length=30)}
    by_seed = {_digest(_image(s)) for s in TaskMixture(seed=1, length=30)}
    by_range = TaskMixture(seed=0, length=30, start=30)
    assert not train & by_seed
    assert not train & {_digest(_image(s)) for s in by_range}
    assert _digest(_image(by_range[0])) == _digest(_image(TaskMixture(seed=0, length=60)[30]))


def test_mixture_weights_and_difficulty():
    m = TaskMixture(weights={"counting": 1.0, "detection": 0.0}, difficulty={"counting": 0.9}, length=10)
    assert {s["task"] for s in m} == {"counting"} and {s["difficulty"] for s in m} == {0.9}
    with pytest.raises(ValueError):
        TaskMixture(weights={"juggling": 1.0})
    with pytest.raises(ValueError):
        CountingTask(1.5)


def test_image_folder_source_feeds_mixture(tmp_path):
    rng = np.random.default_rng(0)
    exts = ["png", "jpg"] + (["webp"] if features.check("webp") else [])
    for i, ext in enumerate(exts):
        sub = tmp_path / ("nested" if i else "")
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (90, 700, 3), dtype=np.uint8)).save(sub / f"im{i}.{ext}")
    (tmp_path / "notes.txt").write_text("not an image")
    src = ImageFolderSource(tmp_path)
    assert len(src) == len(exts) and all(p.rsplit(".", 1)[1] in exts for p in src.paths)
    assert src[0].mode == "RGB"
    m = TaskMixture(weights={"matching": 1, "reconstruction": 1}, image_source=src, real_image_prob=1.0, length=12)
    samples = list(m)
    assert any(s["answer"].get("kind") == "color" for s in samples)
    assert all(max(_image(s).size) <= 512 for s in samples if s["task"] == "reconstruction")
    with pytest.raises(FileNotFoundError):
        ImageFolderSource(tmp_path / "nested" / "missing")


# ---------------------------------------------------------------- metrics


def test_parse_count():
    cases = {"3": 3, "There are 12 red triangles.": 12, "three": 3, "Twenty.": 20, "There are no stars.": 0,
             "none": 0, "I think [BEGIN FINAL RESPONSE]Seven[END FINAL RESPONSE]": 7,
             "Counting 1, 2, 3, 4. Answer: 4": 4, "I cannot tell": None, "": None}
    for text, expected in cases.items():
        assert parse_count(text) == expected, text
    assert counting_accuracy(["3", "four", "x"], [3, {"count": 4}, 0]) == pytest.approx(2 / 3)
    assert counting_accuracy([], []) == 0.0


def test_parse_box_and_iou():
    assert parse_box("Yes, at about (10, 20, 300, 400).") == (10.0, 20.0, 300.0, 400.0)
    assert parse_box("[300 400 10 20]") == (10.0, 20.0, 300.0, 400.0)
    assert parse_box("box: 1.5, 2, 3, 4") == (1.5, 2.0, 3.0, 4.0)
    assert parse_box("No.") is None
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0


def test_detection_score():
    answers = [{"present": True, "box": (0, 0, 100, 100)}, (0, 0, 100, 100), None, {"present": False, "box": None}]
    preds = ["Yes, at about (0, 0, 100, 100).", "Yes, at about (50, 0, 150, 100).", "No.", "Yes, (1, 2, 3, 4)"]
    score = detection_score(preds, answers)
    assert score["presence_accuracy"] == 0.75 and score["n_present"] == 2
    assert score["mean_iou"] == pytest.approx((1 + 1 / 3) / 2) and score["recall_at_0.5"] == 0.5
    assert detection_score(["No."], [(0, 0, 5, 5)])["mean_iou"] == 0.0
    assert parse_presence("There is no blue circle.") is False and parse_presence("hmm") is None


def test_parse_choice():
    cases = {"Answer: B": "B", "(B)": "B", "b": "B", "**C**": "C", "The answer is (d).": "D",
             "B. It is the mirrored crop": "B", "I pick option c": "C", "A": "A", "It must be E.": "E",
             "Z": None, "no idea": None, "A crop like B": None}
    for text, expected in cases.items():
        assert parse_choice(text) == expected, text
    assert choice_accuracy(["Answer: B", "c", "?"], ["B", {"letter": "A"}, "C"]) == pytest.approx(1 / 3)


def test_metrics_score_generated_answers_perfectly():
    m = TaskMixture(seed=11, length=60)
    by_task: dict[str, list] = {}
    for s in m:
        by_task.setdefault(s["task"], []).append((s["messages"][1]["content"], s["answer"]))
    preds, answers = zip(*by_task["counting"])
    assert counting_accuracy(preds, answers) == 1.0
    preds, answers = zip(*by_task["detection"])
    score = detection_score(preds, answers)
    assert score["presence_accuracy"] == 1.0 and score["mean_iou"] in (0.0, 1.0)
    assert score["n_present"] == 0 or score["mean_iou"] == 1.0
    preds, answers = zip(*by_task["matching"])
    assert choice_accuracy(preds, answers) == 1.0


# ---------------------------------------------------------------- identification probes


def test_colour_and_shape_probes_show_one_object_and_ask_the_same_question():
    for task, key, classes in ((ColorTask(0.0, size=(64, 64)), "color", ("red", "green", "blue", "yellow")),
                               (ShapeTask(0.0, size=(64, 64)), "category", ("circle", "square", "triangle"))):
        assert task.classes() == classes
        samples = [task(np.random.default_rng(seed)) for seed in range(60)]
        assert {s["messages"][0]["content"][1]["text"] for s in samples} == {task.question}
        answers = [s["answer"][key] for s in samples]
        assert set(answers) == set(classes) and max(answers.count(c) for c in classes) <= 30
        for s, answer in zip(samples, answers):
            assert s["messages"][1]["content"] == answer
            pixels = np.asarray(_image(s)).reshape(-1, 3)
            colours = {tuple(p) for p in pixels} & {tuple(c) for c in COLORS.values()}
            assert len(colours) == 1  # one flat-coloured object on the grey background
    assert len(ColorTask(1.0).classes()) == len(COLORS) and len(ShapeTask(1.0).classes()) == len(CATEGORIES)
    assert {s["task"] for s in TaskMixture(seed=0, length=20)} <= set(DEFAULT_TASKS)


def test_parse_label_reads_the_named_class():
    assert parse_label("Red.", ("red", "blue")) == "red"
    assert parse_label("I think the answer is: two Circles", ("circle", "square")) == "circle"
    assert parse_label("bluer", ("red", "blue")) is None
    assert label_accuracy(["blue", "it is red", ""], ["blue", "red", "red"], ("red", "blue")) == pytest.approx(2 / 3)
