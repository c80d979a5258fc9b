"""The HTTP gateway: Litestar app, routes per service, served by Granian inside the process."""
