"""`gateway bench`: load generator and bare relay for performance comparisons."""
