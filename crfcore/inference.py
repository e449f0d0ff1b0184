"""inference: see ../shared/DESIGN.md (module ownership); filled in by its issue."""
