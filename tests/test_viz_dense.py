"""The measured pictures on hand-made attention maps and feature grids: known answers."""

import torch

from sslkit.viz.dense import blob_mask, jaccard, mass_mask, pca_patch_maps, upsample_mask


def test_mass_mask_keeps_the_fewest_patches_holding_the_share():
    att = torch.tensor([[[0.05, 0.5], [0.3, 0.15]]])
    assert mass_mask(att).tolist() == [[[False, True], [True, False]]]  # 0.5 + 0.3 >= 0.6
    assert mass_mask(att, 0.5).tolist() == [[[False, True], [False, False]]]
    assert mass_mask(att * 7).tolist() == mass_mask(att).tolist(), "unnormalised maps give the same mask"
    assert mass_mask(att, 1.0).all()
    uniform = torch.full((1, 4, 5), 0.05)
    assert int(mass_mask(uniform).sum()) == 12  # 60% of 20 equal patches


def test_jaccard_and_blob():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2], b[0, 1:3] = True, True  # 8 and 8 pixels, 4 shared: 4 / 12
    torch.testing.assert_close(jaccard(a, b), torch.tensor([4 / 12, 1.0]))
    blob = blob_mask((10, 10), 0.2)
    assert int(blob.sum()) == 20 and blob[4:6, 4:6].all() and not blob[0, 0]
    up = upsample_mask(torch.tensor([[[True, False], [False, False]]]), (4, 4))
    assert up[0, :2, :2].all() and int(up.sum()) == 4


def test_pca_maps_find_the_object_and_colour_its_parts():
    # A 6x6 grid: background patches share one feature; the object (a 2x3 block) has two parts with their own.
    torch.manual_seed(0)
    d = 16
    # The object stands far from the background (the first component); its parts differ less (the second).
    bg, common, diff = torch.randn(d) * 0.1, torch.randn(d) * 3, torch.randn(d)
    part_a, part_b = common + diff, common - diff
    grid = bg.expand(6, 6, d).clone()
    obj = torch.zeros(6, 6, dtype=torch.bool)
    obj[2:4, 1:4] = True
    grid[2:4, 1:3] = part_a
    grid[2:4, 3] = part_b
    patches = (grid + 0.01 * torch.randn(6, 6, d)).reshape(1, 36, d)
    rgb, fg = pca_patch_maps(patches, (6, 6), foreground=obj.reshape(1, 36))
    assert fg[0].equal(obj) and (rgb[0][~obj] == 0).all()
    # The first foreground component (red) separates the parts; the others only scale up noise here.
    assert (rgb[0, 2, 1, 0] - rgb[0, 2, 3, 0]).abs() > 0.9, "the two parts get different colours"
    assert (rgb[0, 2, 1, 0] - rgb[0, 3, 2, 0]).abs() < 0.1, "one part gets one colour"
    # The first-component rule separates object from background (up to the sign of the component).
    _, auto = pca_patch_maps(patches, (6, 6))
    assert auto[0].equal(obj) or auto[0].equal(~obj)
