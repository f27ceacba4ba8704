# Helpers shared by the scripts (sourced, not run): visible steps, the project venv, quiet pip.

PYTHON=${PYTHON:-python3}

step() { printf '==> %s\n' "$*"; }

ensure_venv() {
    if [ ! -x venv/bin/python ]; then
        step "creating venv/ with $("$PYTHON" --version)"
        "$PYTHON" -m venv venv
        venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    fi
}

# pip without its progress chatter; setuptools' deprecation warnings while building the editable wheel are
# about setuptools itself, not this project, so they are not shown.
pip_install() {
    PYTHONWARNINGS=ignore venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"
}
