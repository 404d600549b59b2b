"""`sample --xyz`: each cell of the grid is the plain `sample` of its settings (same pixels), the axes are
written on the picture and in its text chunk, `--from grid.png --cell` re-draws a cell, bad axes are one
line and exit 2."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from lora4diffusion import xyz
from lora4diffusion.cli import main
from lora4diffusion.cli.sample import NUMBERS
from lora4diffusion.prompt_syntax import TagWeight

pytestmark = pytest.mark.usefixtures("one_thread")


def _pixels(path):
    return np.asarray(Image.open(path))


def _grid(path):
    with Image.open(path) as im:
        return np.asarray(im), json.loads(im.info[xyz.GRID_KEY]), im.info["parameters"]


def _crop(pixels, box):
    left, top, w, h = box
    return pixels[top : top + h, left : left + w]


def test_adapter_weight_grid_cells_are_plain_samples(tmp_path, caplog):
    """The shipped base and adapter: cell (weight 0.8, seed 1) is `sample --lora bold:0.8 --seed 1`."""
    common = ["-q", "sample", "--prompt", "the digit 3", "--num", "2", "--steps", "2"]
    g, p, r = tmp_path / "g", tmp_path / "p", tmp_path / "r"
    assert main([*common, "--lora", "bold", "--xyz", "lora:bold=0,0.8", "--xyz", "seed=0,1",
                 "--out", str(g)]) == 0
    absent = [r for r in caplog.records if "is absent from prompt" in r.getMessage()]
    assert len(absent) == 1  # said once for the grid, not once per cell
    assert main([*common, "--lora", "bold:0.8", "--seed", "1", "--out", str(p)]) == 0
    pixels, record, a1111 = _grid(g / "grid.png")
    assert record["axes"] == [{"axis": "lora:bold", "values": ["0", "0.8"]},
                              {"axis": "seed", "values": ["0", "1"]}]
    assert "X/Y/Z plot: lora:bold: 0, 0.8; seed: 0, 1" in a1111
    cells = {tuple(c["cell"]): c for c in record["cells"]}
    assert sorted(cells) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    plain = _pixels(p / "samples.png")
    assert np.array_equal(_crop(pixels, cells[(2, 2)]["box"]), plain)
    assert cells[(2, 2)]["record"]["loras"] == [["bold", 0.8]] and cells[(2, 2)]["record"]["seed"] == 1
    # the weight acts: weight 0 and 0.8 at one seed differ
    assert not np.array_equal(_crop(pixels, cells[(1, 2)]["box"]), _crop(pixels, cells[(2, 2)]["box"]))
    # labels: a margin above and left of the cells, holding dark text on white
    left, top, w, h = cells[(1, 1)]["box"]
    assert left > 0 and top > 0 and pixels.shape == (top + 2 * h + xyz.GAP, left + 2 * w + xyz.GAP)
    assert pixels[:top].min() < 100 and pixels[top:, :left].min() < 100
    assert main(["-q", "sample", "--from", str(g / "grid.png"), "--cell", "2,2", "--out", str(r)]) == 0
    assert np.array_equal(_pixels(r / "samples.png"), plain)
    assert np.array_equal(np.load(r / "samples.npz")["images"], np.load(p / "samples.npz")["images"])


def test_three_axes_z_side_by_side_and_cell_redraw(tiny_label_run, tmp_path):
    common = ["-q", "sample", "--checkpoint", str(tiny_label_run), "--digits", "3,5", "--per-digit", "2"]
    g, p, r = tmp_path / "g", tmp_path / "p", tmp_path / "r"
    assert main([*common, "--xyz", "steps=1,2", "--xyz", "cfg=1,2.5", "--xyz", "seed=0,7",
                 "--out", str(g)]) == 0
    assert main([*common, "--steps", "1", "--guidance", "2.5", "--seed", "7", "--out", str(p)]) == 0
    pixels, record, _ = _grid(g / "grid.png")
    assert [a["axis"] for a in record["axes"]] == ["steps", "guidance", "seed"]
    cells = {tuple(c["cell"]): c for c in record["cells"]}
    assert len(cells) == 8
    first, second = cells[(1, 1, 1)]["box"], cells[(1, 1, 2)]["box"]
    assert second[0] > first[0] + 2 * first[2] and second[1] == first[1]  # Z: the grids side by side
    plain = _pixels(p / "samples.png")
    assert np.array_equal(_crop(pixels, cells[(1, 2, 2)]["box"]), plain)
    assert main(["-q", "sample", "--from", str(g / "grid.png"), "--cell", "1,2,2", "--out", str(r)]) == 0
    assert np.array_equal(_pixels(r / "samples.png"), plain)


def _args(**kw):
    base = {"lora": [], "lora_blocks": [], "prompt": None, "negative": None, "steps": None, "seed": None}
    return argparse.Namespace(**{**base, **kw})


def test_cell_args_set_each_kind_of_axis():
    axes = xyz.parse_axes(["te:a=0.5,1", "unet:b=0.25", "prompt_sr=3,7"], NUMBERS)
    args = _args(lora=["a:0.8", "b:0.6:0.7"], prompt=["the digit 3"], negative="not 3")
    loras = [("a", 0.8), ("b", TagWeight(0.6, 0.7))]
    cell = xyz.cell_args(args, axes, (0, 0, 1), loras)
    assert cell.lora == ["a:0.5:0.8", "b:0.6:0.25"]
    assert cell.prompt == ["the digit 7"] and cell.negative == "not 7"
    assert args.prompt == ["the digit 3"]  # the given arguments are not changed
    cell = xyz.cell_args(args, xyz.parse_axes(["lora:b=1.5", "lbw:a=OUTS"], NUMBERS), (0, 0, 0), loras)
    assert cell.lora == ["a:0.8", "b:1.5"] and cell.lora_blocks == ["a=OUTS"]
    assert xyz.cell_indices(axes)[:3] == [(0, 0, 0), (1, 0, 0), (0, 0, 1)]


@pytest.mark.parametrize("extra, match", [
    (["--xyz", "colour=1,2"], "unknown axis 'colour'"),
    (["--xyz", "steps"], "write AXIS=V1,V2"),
    (["--xyz", "steps=0,2"], "must be > 0"),
    (["--xyz", "guidance=1,99"], "value '99'"),
    (["--xyz", "sampler=ddim,euler"], "'euler' is not one of"),
    (["--xyz", "seed=1,1"], "given twice"),
    (["--xyz", "steps=1,"], "an empty value"),
    (["--xyz", "lora:bold=0.5"], "not the PATH of a --lora"),
    (["--xyz", "lora:bold=9"], "weight 9"),
    (["--xyz", "prompt_sr=3,5"], "give --prompt"),
    (["--xyz", "digits=3,x"], "--xyz digits=3,x"),
    (["--xyz", "seed=" + ",".join(map(str, range(65)))], "65 cells, over the limit of 64"),
    (["--xyz", "seed=0,1", "--xyz", "steps=1,2", "--xyz", "eta=0,1", "--xyz", "cfg=1,2"], "4 axes"),
    (["--xyz", "seed=0,1", "--xyz", "seed=2"], "'seed' is given twice"),
    (["--xyz", "seed=0,1", "--trajectory"], "--trajectory goes with"),
    (["--cell", "1,1"], "--cell goes with --from"),
])
def test_bad_axes_are_refused_before_writing(tiny_label_run, tmp_path, capsys, extra, match):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(["sample", "--checkpoint", str(tiny_label_run), "--out", str(out), *extra]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err
    assert not out.exists()


def test_bad_cells_are_refused(tiny_label_run, tmp_path, capsys):
    g = tmp_path / "g"
    common = ["sample", "--checkpoint", str(tiny_label_run), "--digits", "1", "--per-digit", "1",
              "--steps", "1"]
    assert main(["-q", *common, "--xyz", "seed=0,1", "--out", str(g)]) == 0
    capsys.readouterr()
    for cell, match in (("3,1", "no such cell in this 2 grid"), ("0,1", "counted from 1"), ("a", "X,Y[,Z]")):
        with pytest.raises(SystemExit) as e:
            raise SystemExit(main(["sample", "--from", str(g / "grid.png"), "--cell", cell,
                                   "--out", str(tmp_path / "r")]))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and match in err, err
    with pytest.raises(SystemExit):  # --from a grid without --cell: says which cell to give
        raise SystemExit(main(["sample", "--from", str(g / "grid.png"), "--out", str(tmp_path / "r")]))
    assert "is an X/Y/Z grid: add --cell X,Y[,Z]" in capsys.readouterr().err


def test_a_bad_block_weight_value_writes_no_grid(tmp_path, capsys):
    """A bad block-weight spec is refused before any cell is drawn: one line, no grid."""
    out = tmp_path / "g"
    argv = ["sample", "--prompt", "sks the digit 3", "--num", "1", "--steps", "1", "--lora", "bold",
            "--xyz", "lbw:bold=OUTS,BOGUS", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "BOGUS" in err, err
    assert not out.exists()


def test_long_labels_are_shortened_to_the_cell(tiny_label_run, tmp_path):
    g = tmp_path / "g"
    assert main(["-q", "sample", "--checkpoint", str(tiny_label_run), "--digits", "1", "--per-digit", "1",
                 "--steps", "1", "--xyz", "seed=" + ",".join(str(10**17 + i) for i in range(2)),
                 "--out", str(g)]) == 0
    pixels, record, _ = _grid(g / "grid.png")
    assert record["axes"][0]["values"][1] == str(10**17 + 1)  # the record keeps the whole value
    left, top, w, _ = next(c["box"] for c in record["cells"] if c["cell"] == [1])
    assert pixels.shape[1] == 2 * w + xyz.GAP  # the label did not widen the grid
