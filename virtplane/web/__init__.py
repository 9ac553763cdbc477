"""virtplane.web: the web console (React + PatternFly, built with Vite into `dist/`) and its static route."""
