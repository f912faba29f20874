"""The Wander paper's tables and figures: specs (``specs``), rendering from run records
(``render.render_all``), and the cell-by-cell change between two git revisions
(``diff.diff_tables``)."""
