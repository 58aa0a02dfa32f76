import pytest

from sslkit.plugins import load_all
from sslkit.registry import ALL, Registry, RegistryError


def test_build_passes_kwargs_and_unknown_name_lists_valid():
    reg = Registry("widget")

    @reg.register("small")
    def small(size: int = 1):
        return ("small", size)

    assert reg.build("small", size=3) == ("small", 3)
    with pytest.raises(RegistryError, match=r"unknown widget 'smal'.*Did you mean 'small'.*Valid widgets: small"):
        reg.build("smal")


def test_unknown_kwarg_names_accepted_ones():
    reg = Registry("widget")

    @reg.register("a")
    def a(size: int = 1, colour: str = "red"):
        return size

    with pytest.raises(RegistryError, match=r"unknown argument\(s\) \['sise'\].*accepts: \['colour', 'size'\]"):
        reg.build("a", sise=2)


def test_duplicate_registration_fails():
    reg = Registry("widget")
    reg.register("a")(lambda: 1)
    with pytest.raises(RegistryError, match="registered twice"):
        reg.register("a")(lambda: 2)


def test_prefix_factory():
    reg = Registry("model")
    reg.register_prefix("lib", lambda name, **kw: (name, kw))
    assert "lib:x" in reg
    assert reg.build("lib:resnet", depth=3) == ("resnet", {"depth": 3})


def test_project_registries_are_filled():
    load_all()
    assert {"simclr"} <= set(ALL["objectives"].names())
    assert {"fashion_mnist", "cifar10", "cifar100", "image_folder", "synthetic"} <= set(ALL["datasets"].names())
    assert {"resnet18_cifar", "resnet50", "vit_tiny_patch4_32", "vit_small_patch16_224"} <= set(ALL["encoders"].names())
    assert "simclr" in ALL["augmentations"].names()
