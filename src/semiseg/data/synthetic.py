"""Deterministic synthetic CT-like abdominal volumes with a pancreas-like target.

Each case is a small contrast-enhanced abdominal CT in Hounsfield units: air around an
elliptic body with subcutaneous fat, an abdominal muscle wall, visceral fat, liver,
spleen, two kidneys, a vertebral body with cortical bone, the aorta, bowel loops with gas
pockets and a duodenum-like loop, and the target: an elongated, curved, lobulated
soft-tissue tube (head near the duodenum, tail near the spleen) whose enhancement is close
to that of the bowel and duodenum next to it, and which a thin fat plane separates from the
solid organs (liver, spleen, kidneys). Scanner blur and noise are added. Voxel
spacing is anisotropic (in-plane < 1 mm, slices 1.5-3 mm), and size, position, shape and
origin vary from case to case. All anatomy is defined in millimetres, so it does not
depend on the sampling grid.

Case ``i`` of seed ``s`` is a pure function of ``(s, i)`` and the parameters.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import spline_filter1d

from semiseg.data import case_id
from semiseg.io.atomic import atomic_path, atomic_write_text
from semiseg.io.readers import Geometry, from_xyz_array

#: Mean HU of each tissue (portal-venous phase); the per-case value is jittered.
TISSUE_HU = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 55.0,
    "liver": 105.0,
    "spleen": 115.0,
    "kidney": 170.0,
    "aorta": 180.0,
    "bone_cortex": 750.0,
    "bone_marrow": 230.0,
    "bowel": 95.0,
    "gas": -900.0,
    "target": 100.0,
}


@dataclass(frozen=True)
class SyntheticParams:
    """Ranges for the generator (mm unless stated)."""

    inplane_spacing: tuple[float, float] = (0.66, 0.95)
    slice_spacing: tuple[float, float] = (1.5, 3.0)
    body_semi_axis_x: tuple[float, float] = (62.0, 80.0)
    body_semi_axis_y: tuple[float, float] = (46.0, 58.0)
    z_extent: tuple[float, float] = (72.0, 104.0)
    fov_margin: tuple[float, float] = (6.0, 22.0)
    target_length: tuple[float, float] = (55.0, 75.0)
    target_radius_head: tuple[float, float] = (9.5, 12.5)
    target_radius_tail: tuple[float, float] = (5.5, 7.0)
    target_offset_hu: tuple[float, float] = (8.0, 20.0)
    #: Thickness of the fat plane that separates the target from the liver, spleen and
    #: kidneys (not from the bowel and duodenum, which touch it); 0 disables it.
    target_fat_plane_mm: tuple[float, float] = (1.5, 3.0)
    noise_sd: tuple[float, float] = (8.0, 18.0)
    blur_sd_mm: float = 0.6


def _cubic_bspline(x: np.ndarray) -> np.ndarray:
    """The centred cubic B-spline basis function."""
    x = np.abs(x)
    return np.where(x < 1, (4 - 6 * x**2 + 3 * x**3) / 6, np.where(x < 2, (2 - x) ** 3 / 6, 0.0))


def _bspline_matrix(n_coarse: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), n_coarse) matrix of cubic B-spline interpolation along one axis.

    Row ``i`` maps samples on the integer grid ``0 .. n_coarse - 1`` to the interpolated value
    at the continuous index ``positions[i]``: the interpolating prefilter (whole-sample
    mirror boundary) followed by the four basis weights, with mirrored indices at the
    borders. This is what SimpleITK's B-spline interpolator computes, one axis at a time.
    """
    prefilter = spline_filter1d(np.eye(n_coarse), order=3, axis=0, mode="mirror")
    base = np.floor(positions).astype(int)
    weights = np.zeros((positions.size, n_coarse))
    rows = np.arange(positions.size)
    for offset in (-1, 0, 1, 2):
        k = base + offset
        w = _cubic_bspline(positions - k)
        k = np.abs(k)
        k = np.where(k > n_coarse - 1, 2 * (n_coarse - 1) - k, k)
        np.add.at(weights, (rows, k), w)
    return weights @ prefilter


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray, scale_mm: float) -> np.ndarray:
    """Zero-mean, unit-SD smooth random field with correlation length ``scale_mm``.

    White noise on a grid of ``scale_mm`` spacing (origin ``-scale_mm``) interpolated with
    cubic B-splines onto the case's grid (origin 0). The interpolation is separable, so it
    is done as three small matrix products; ``tests/test_synthetic.py`` checks it against
    SimpleITK's resampler (agreement to float32 rounding).
    """
    coarse = np.maximum(2, np.ceil(np.asarray(shape) * spacing / scale_mm).astype(int) + 2)
    # Drawn in (z, y, x) order, as the image array of an (x, y, z) grid.
    field = rng.standard_normal(tuple(coarse[::-1])).astype(np.float32).transpose(2, 1, 0).astype(np.float64)
    mx, my, mz = (_bspline_matrix(int(coarse[a]), np.arange(shape[a]) * spacing[a] / scale_mm + 1.0) for a in range(3))
    field = np.tensordot(mx, field, axes=(1, 0))  # (x, b, c)
    field = np.tensordot(field, my, axes=(1, 1))  # (x, c, y)
    arr = np.tensordot(field, mz, axes=(1, 1)).astype(np.float32)  # (x, y, z)
    return (arr - arr.mean()) / (arr.std() + 1e-6)


def _box(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Index range of the sorted 1-D ``coords`` within ``[lo, hi]`` (widened by one voxel)."""
    idx = np.flatnonzero((coords >= lo) & (coords <= hi))
    if idx.size == 0:
        return slice(0, 0)
    return slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2)


def smooth_noise_by_resampling(rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray, scale_mm: float) -> np.ndarray:
    """The slow reference of :func:`_smooth_noise`: the same field through SimpleITK's B-spline
    resampler over the whole grid (what the generator did before; the tests and
    ``benchmarks/bench_generator.py`` compare the two)."""
    coarse = np.maximum(2, np.ceil(np.asarray(shape) * spacing / scale_mm).astype(int) + 2)
    field = sitk.GetImageFromArray(rng.standard_normal(tuple(coarse[::-1])).astype(np.float32))
    field.SetSpacing([float(scale_mm)] * 3)
    field.SetOrigin([-scale_mm] * 3)
    ref = sitk.Image([int(s) for s in shape], sitk.sitkFloat32)
    ref.SetSpacing([float(s) for s in spacing])
    out = sitk.Resample(field, ref, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    return (arr - arr.mean()) / (arr.std() + 1e-6)


def _ellipsoid(X, Y, Z, centre, axes, wobble=None, amount=0.0):
    """Voxels with ``sum(((coord - centre) / axes) ** 2) + amount * wobble <= 1`` (mm grids).

    Evaluated in the ellipsoid's bounding box only: the wobble can grow the axes by at most
    ``sqrt(1 + amount * max(-wobble))``, so the box holds every voxel the full-volume
    formula would select.
    """
    shape = (X.shape[0], Y.shape[1], Z.shape[2])
    grow = 1.0
    if wobble is not None and amount > 0:
        grow = float(np.sqrt(1.0 + amount * max(0.0, -float(wobble.min()))))
    sx, sy, sz = (
        _box(g.ravel(), c - a * grow, c + a * grow) for g, c, a in zip((X, Y, Z), centre, axes, strict=True)
    )
    mask = np.zeros(shape, dtype=bool)
    x, y, z = X[sx, :, :], Y[:, sy, :], Z[:, :, sz]
    if x.size == 0 or y.size == 0 or z.size == 0:
        return mask
    r = ((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2 + ((z - centre[2]) / axes[2]) ** 2
    if wobble is not None:
        r = r + amount * wobble[sx, sy, sz]
    mask[sx, sy, sz] = r <= 1.0
    return mask


def _tube(X, Y, Z, points: np.ndarray, radii: np.ndarray, wobble: np.ndarray | None = None, amount: float = 0.0):
    """Voxels within ``radii[k]`` of polyline vertex ``points[k]`` (mm), bounded-box search."""
    lo = points.min(axis=0) - radii.max() - 1
    hi = points.max(axis=0) + radii.max() + 1
    xs = np.flatnonzero((X[:, 0, 0] >= lo[0]) & (X[:, 0, 0] <= hi[0]))
    ys = np.flatnonzero((Y[0, :, 0] >= lo[1]) & (Y[0, :, 0] <= hi[1]))
    zs = np.flatnonzero((Z[0, 0, :] >= lo[2]) & (Z[0, 0, :] <= hi[2]))
    shape = (X.shape[0], Y.shape[1], Z.shape[2])
    mask = np.zeros(shape, dtype=bool)
    if xs.size == 0 or ys.size == 0 or zs.size == 0:
        return mask
    sx, sy, sz = slice(xs[0], xs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(zs[0], zs[-1] + 1)
    x, y, z = X[sx, :, :], Y[:, sy, :], Z[:, :, sz]
    best = np.full((x.shape[0], y.shape[1], z.shape[2]), np.inf, dtype=np.float32)
    for p, r in zip(points, radii, strict=True):
        d = np.sqrt((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / r
        np.minimum(best, d, out=best)
    if wobble is not None:
        best = best + amount * wobble[sx, sy, sz]
    mask[sx, sy, sz] = best <= 1.0
    return mask


def _bezier(p0, p1, p2, n):
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def generate_case(seed: int, index: int, params: SyntheticParams | None = None) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Generate case ``index`` of seed ``seed``.

    Returns ``(image (X, Y, Z) int16 HU, label (X, Y, Z) uint8 {0, 1}, geometry)``.
    """
    p = params or SyntheticParams()
    rng = np.random.default_rng([int(seed), int(index)])
    u = rng.uniform

    sxy = round(u(*p.inplane_spacing), 4)
    sz = round(u(*p.slice_spacing), 3)
    spacing = np.array([sxy, sxy, sz])
    ax, ay = u(*p.body_semi_axis_x), u(*p.body_semi_axis_y)
    fov_x = 2 * (ax + u(*p.fov_margin))
    fov_y = 2 * (ay + u(*p.fov_margin))
    zext = u(*p.z_extent)
    shape = (int(round(fov_x / sxy)), int(round(fov_y / sxy)), int(round(zext / sz)))
    origin = np.array([u(-220, -120), u(-260, -150), u(-600, 100)]).round(3)

    # Centred physical coordinates (mm) as open grids: x left-right, y anterior(-)/posterior(+), z cranial(+).
    X = ((np.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0]).astype(np.float32)[:, None, None]
    Y = ((np.arange(shape[1]) - (shape[1] - 1) / 2) * spacing[1]).astype(np.float32)[None, :, None]
    Z = ((np.arange(shape[2]) - (shape[2] - 1) / 2) * spacing[2]).astype(np.float32)[None, None, :]
    # Body offset in the field of view.
    bx, by = u(-0.3, 0.3) * (fov_x / 2 - ax), u(-0.3, 0.3) * (fov_y / 2 - ay)
    Xb, Yb = X - bx, Y - by

    hu = {k: v + (u(-8, 8) if k not in ("air", "gas") else 0.0) for k, v in TISSUE_HU.items()}
    # The target enhances like its neighbours (bowel, duodenum): the hard part of the task.
    hu["target"] = hu["bowel"] + u(*p.target_offset_hu)

    wob = _smooth_noise(rng, shape, spacing, 14.0)
    texture = _smooth_noise(rng, shape, spacing, 4.0)

    # Body outline: ellipse whose axes vary slowly along z.
    zmod = 1 + 0.05 * np.sin(Z / 35.0 + u(0, 6.28))
    rb = (Xb / (ax * zmod)) ** 2 + (Yb / (ay * zmod)) ** 2 + 0.04 * wob
    fat_t, muscle_t = u(6, 12), u(4, 8)
    body = rb <= 1.0
    inner_muscle = (Xb / (ax * zmod - fat_t)) ** 2 + (Yb / (ay * zmod - fat_t)) ** 2 <= 1.0
    cavity = (Xb / (ax * zmod - fat_t - muscle_t)) ** 2 + (Yb / (ay * zmod - fat_t - muscle_t)) ** 2 <= 1.0

    img = np.full(shape, hu["air"], dtype=np.float32)
    img[body] = hu["fat"]
    img[inner_muscle & ~cavity] = hu["muscle"]
    img[cavity] = hu["fat"]  # visceral fat

    ca, cb = ax - fat_t - muscle_t, ay - fat_t - muscle_t  # cavity semi-axes (mm)

    def at(fx, fy, fz=0.0):
        return np.array([bx + fx * ca, by + fy * cb, fz])

    # Vertebra (posterior, centred) with marrow and cortex, spinal canal behind it.
    vc = at(u(-0.05, 0.05), 0.62)
    vr = u(13, 17)
    def full(mask):
        return np.broadcast_to(mask, shape)

    rv = np.sqrt((X - vc[0]) ** 2 + ((Y - vc[1]) / 0.85) ** 2)
    vert = full(rv <= vr)
    img[vert] = hu["bone_cortex"]
    img[full(rv <= vr - u(1.5, 2.5))] = hu["bone_marrow"]
    canal = full(np.sqrt((X - vc[0]) ** 2 + (Y - (vc[1] + vr + 5)) ** 2) <= 6)
    img[canal & cavity] = 20.0
    # Paraspinal muscles.
    for side in (-1, 1):
        img[_ellipsoid(X, Y, Z, (vc[0] + side * (vr + 10), vc[1] + 4, 0), (11, 14, 1e4)) & cavity] = hu["muscle"]
    # Aorta anterior-left of the vertebra.
    aorta_c = (vc[0] + u(3, 7), vc[1] - vr - u(7, 10))
    aorta_r = u(6.5, 8.5)
    aorta = full(np.sqrt((X - aorta_c[0]) ** 2 + (Y - aorta_c[1]) ** 2) <= aorta_r)
    # Kidneys posterior-lateral.
    kidneys = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        kc = vc + np.array([side * u(28, 38), u(-6, 2), u(-15, 10)])
        kidneys |= _ellipsoid(X, Y, Z, kc, (u(12, 16), u(9, 12), u(25, 35)), wob, 0.08)
    # Liver (patient right = image -x here) and spleen (+x).
    liver = _ellipsoid(X, Y, Z, at(-0.45, -0.1, u(15, 30)), (ca * 0.55, cb * 0.75, u(45, 60)), wob, 0.15)
    spleen = _ellipsoid(X, Y, Z, at(0.62, 0.3, u(10, 25)), (u(12, 17), u(16, 22), u(25, 35)), wob, 0.12)

    # Target: curved tube from the head (right, near duodenum) to the tail (left, near spleen),
    # anterior to the aorta, rising towards the tail.
    length = u(*p.target_length)
    head = np.array([aorta_c[0] - length * u(0.45, 0.55), aorta_c[1] - u(8, 16), u(-14, -4)])
    tail = np.array([aorta_c[0] + length * u(0.45, 0.55), aorta_c[1] + u(-4, 6), head[2] + u(8, 18)])
    ctrl = (head + tail) / 2 + np.array([u(-6, 6), -u(10, 22), u(-4, 4)])
    pts = _bezier(head, ctrl, tail, 48)
    radii = np.linspace(u(*p.target_radius_head), u(*p.target_radius_tail), len(pts)) * (1 + 0.12 * np.sin(np.linspace(0, u(6, 14), len(pts))))
    target = _tube(X, Y, Z, pts, radii, texture, 0.10) & cavity & ~vert & ~aorta

    # Duodenum-like loop around the head, and bowel loops with gas pockets, touching the target.
    d_ang = np.linspace(u(0.3, 0.8) * np.pi, u(1.6, 1.9) * np.pi, 40)
    d_r = radii[0] + u(5, 8)
    duo_pts = np.stack([head[0] + d_r * np.cos(d_ang), head[1] + d_r * np.sin(d_ang), head[2] + np.linspace(-6, 6, 40)], axis=1)
    bowel = _tube(X, Y, Z, duo_pts, np.full(len(duo_pts), u(4.5, 6.5)))
    gas = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(4, 8))):
        c = at(u(-0.6, 0.6), u(-0.85, -0.25), u(-zext / 3, zext / 3))
        a = np.array([u(7, 14), u(6, 11), u(8, 18)])
        loop = _ellipsoid(X, Y, Z, c, a, wob, 0.2)
        bowel |= loop
        if rng.random() < 0.6:
            gas |= _ellipsoid(X, Y, Z, c + np.array([0, -a[1] * 0.5, 0]), a * 0.35)
    # A loop right next to the tail, touching it.
    bowel |= _ellipsoid(X, Y, Z, tail + np.array([u(-4, 4), -u(9, 12), u(-3, 3)]), (u(8, 12), u(5, 7), u(7, 10)), wob, 0.1)

    order = [  # later overwrites earlier
        (bowel & cavity, "bowel"), (liver & cavity, "liver"), (spleen & cavity, "spleen"),
        (kidneys & cavity, "kidney"), (gas & bowel & cavity, "gas"), (aorta & cavity, "aorta"),
    ]
    for mask, tissue in order:
        img[mask & ~vert] = hu[tissue]
    plane = u(*p.target_fat_plane_mm)
    if plane > 0:
        # Peri-pancreatic fat: the target displaces the solid organs behind a fat plane.
        halo = _tube(X, Y, Z, pts, radii + plane, texture, 0.10) & cavity & ~vert & ~aorta
        img[halo & ~target & (liver | spleen | kidneys)] = hu["fat"]
    else:
        target &= ~(liver | spleen | kidneys)
    img[target] = hu["target"]

    # Tissue texture, scanner blur (PSF) and noise.
    soft = body & (img > -300) & (img < 300)
    img[soft] += 7.0 * texture[soft]
    itk = sitk.GetImageFromArray(img.transpose(2, 1, 0))
    itk.SetSpacing([float(s) for s in spacing])
    img = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(itk, p.blur_sd_mm)).transpose(2, 1, 0)
    img = img + rng.normal(0.0, u(*p.noise_sd), size=shape).astype(np.float32)
    image = np.clip(np.round(img), -1024, 3071).astype(np.int16)

    label = target.astype(np.uint8)
    geometry = Geometry(shape, tuple(float(s) for s in spacing), tuple(float(o) for o in origin), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return image, label, geometry


def _write_case(out: Path, seed: int, index: int, params: SyntheticParams, prefix: str) -> str:
    """Generate case ``index`` and write its image and label (each atomically)."""
    cid = case_id(index, prefix)
    image, label, geom = generate_case(seed, index, params)
    for sub, arr in (("imagesTr", image), ("labelsTr", label)):
        with atomic_path(out / sub / f"{cid}.nii.gz") as tmp:
            sitk.WriteImage(from_xyz_array(arr, geom), str(tmp), useCompression=True)
    return cid


def write_demo_dataset(
    out_dir: str | Path,
    num_cases: int,
    seed: int,
    params: SyntheticParams | None = None,
    prefix: str = "demo",
    target_name: str = "pancreas",
    workers: int = 1,
) -> list[str]:
    """Write ``num_cases`` synthetic cases as a raw data set in the MSD layout.

    ``out_dir/imagesTr/<case>.nii.gz``, ``out_dir/labelsTr/<case>.nii.gz`` and
    ``out_dir/dataset.json`` (written last), each file atomically. ``workers > 1`` writes
    the cases in that many processes; every case is a pure function of ``(seed, index)``,
    so the files are the same either way. Returns the case IDs.
    """
    out = Path(out_dir)
    params = params or SyntheticParams()
    if workers > 1 and num_cases > 1:
        with ProcessPoolExecutor(max_workers=min(workers, num_cases)) as pool:
            futures = [pool.submit(_write_case, out, seed, i, params, prefix) for i in range(num_cases)]
            ids = [f.result() for f in futures]
    else:
        ids = [_write_case(out, seed, i, params, prefix) for i in range(num_cases)]
    meta = {
        "name": prefix,
        "description": "Synthetic CT-like abdominal volumes with a pancreas-like target (semiseg demo)",
        "reference": "semiseg.data.synthetic",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": target_name},
        "numTraining": num_cases,
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids],
        "test": [],
        "generator": {"seed": seed, "num_cases": num_cases, "params": asdict(params)},
    }
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=2) + "\n")
    return ids
