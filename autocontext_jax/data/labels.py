"""The label set of the paper: background plus seven abdominal structures."""

# Index i is model class i; the names follow Roth et al. (2018), Table 1.
PAPER_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "artery",
    "portal_vein",
    "liver",
    "spleen",
    "stomach",
    "gallbladder",
    "pancreas",
)
NUM_PAPER_CLASSES = len(PAPER_CLASS_NAMES)


def class_names(num_classes: int) -> tuple[str, ...]:
    """Display names of the model's classes: the paper's for 8 classes, numbers otherwise."""
    if num_classes == NUM_PAPER_CLASSES:
        return PAPER_CLASS_NAMES
    return ("background",) + tuple(f"class_{k}" for k in range(1, num_classes))
