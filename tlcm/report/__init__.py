"""What users look at: the benchmark's markdown tables and labelled sample grids."""
