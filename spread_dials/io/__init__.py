"""Reading and writing files: measured f'/f'' tables (and, later, image containers)."""
