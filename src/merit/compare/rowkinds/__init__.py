"""The built-in rows of ``merit compare``: each module registers its kinds of row in
:data:`merit.compare.rows.ROWS` (a new row is one new module here, or a plugin's)."""
