"""`backprop ui`: the web app (the one place the engine's command line reaches into app/)."""

from __future__ import annotations

import argparse

from training.extras import require


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    ui = sub.add_parser("ui", parents=[common], help="the web app: train, watch, export and chat in a browser",
                        description="Serves the production build on one port and opens the browser.")  # fmt: skip
    ui.add_argument("--port", type=int, help="default 7862 (ui.port)")
    ui.add_argument("--host", help="default 127.0.0.1 (ui.host)")
    ui.add_argument("--dev", action="store_true", help="hot reload, for developing the app")
    ui.add_argument("--no-browser", action="store_true")
    ui.add_argument(
        "--auth",
        action="store_true",
        help="require a password (BACKPROPAGATE_UI__PASSWORD, or asked for) on every page, event and upload",
    )
    ui.add_argument("--share", nargs="?", const="auto", metavar="TUNNEL",
                    help="publish through a tunnel: cloudflared, ngrok or ssh:user@host (default: whichever is "
                         "installed); refused without --auth")  # fmt: skip
    ui.set_defaults(handler=cmd_ui)


def cmd_ui(args: argparse.Namespace) -> int:
    require("ui")
    from app.launch import serve  # the one place the engine's command line reaches into the web app

    return serve(args.host, args.port, dev=args.dev, open_browser=not args.no_browser, auth=args.auth, share=args.share)
