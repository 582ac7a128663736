"""The operator console (`/console`) and the tenant portal (`/portal`), served with the admin API.

Server-rendered pages (Jinja2 templates in templates/, htmx and uPlot vendored in static/vendor/, no Node
at install or run time). Nothing is imported here, so `gateway.admin.router` can mount the portal-link
route (`gateway.console.portal_links`) without a cycle; `gateway.console.mount.mount_console(app, ...)`
mounts the pages.
"""
