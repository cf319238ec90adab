"""Built-in recipes (YAML), shipped inside the package as nmcli.builtin_recipes."""
