"""Reflex configuration of Backprop's web app (`backprop ui` starts it; see app/app.py)."""

import reflex as rx

config = rx.Config(
    app_name="app",
    telemetry_enabled=False,
    show_built_with_reflex=False,
    plugins=[rx.plugins.RadixThemesPlugin(theme=rx.theme(appearance="inherit", accent_color="indigo", gray_color="slate"))],
    disable_plugins=[rx.plugins.SitemapPlugin],
    state_manager_mode="memory",
)
