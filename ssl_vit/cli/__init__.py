"""`ssl-vit <command>`: thin argument parsing over the library."""
