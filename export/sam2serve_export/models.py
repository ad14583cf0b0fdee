"""The official SAM 2 / SAM 2.1 models: config inside Meta's `sam2` package, checkpoint URL, pinned digest.

Digests and sizes are those of the files Meta publishes at dl.fbaipublicfiles.com; each was cross-checked
against at least two independent public sources (Hugging Face LFS pointers of facebook/* repos and projects
that verify downloads from Meta's host against them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnknownModelError

SAM2_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/072824"
SAM2_1_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: str  # hydra config name inside the sam2 package
    base_url: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return f"{self.name}.pt"

    def url(self, base_url: str | None = None) -> str:
        return f"{(base_url or self.base_url).rstrip('/')}/{self.filename}"


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("sam2_hiera_tiny", "configs/sam2/sam2_hiera_t.yaml", SAM2_BASE_URL,
                  "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125", 155906050),
        ModelSpec("sam2_hiera_small", "configs/sam2/sam2_hiera_s.yaml", SAM2_BASE_URL,
                  "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3", 184309650),
        ModelSpec("sam2_hiera_base_plus", "configs/sam2/sam2_hiera_b+.yaml", SAM2_BASE_URL,
                  "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071", 323493298),
        ModelSpec("sam2_hiera_large", "configs/sam2/sam2_hiera_l.yaml", SAM2_BASE_URL,
                  "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b", 897952466),
        ModelSpec("sam2.1_hiera_tiny", "configs/sam2.1/sam2.1_hiera_t.yaml", SAM2_1_BASE_URL,
                  "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", 156008466),
        ModelSpec("sam2.1_hiera_small", "configs/sam2.1/sam2.1_hiera_s.yaml", SAM2_1_BASE_URL,
                  "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", 184416285),
        ModelSpec("sam2.1_hiera_base_plus", "configs/sam2.1/sam2.1_hiera_b+.yaml", SAM2_1_BASE_URL,
                  "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", 323606802),
        ModelSpec("sam2.1_hiera_large", "configs/sam2.1/sam2.1_hiera_l.yaml", SAM2_1_BASE_URL,
                  "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", 898083611),
    )
}

DEFAULT_MODEL = "sam2.1_hiera_tiny"


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)}"
        ) from None
