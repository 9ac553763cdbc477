import '@patternfly/react-core/dist/styles/base.css';
import '@xterm/xterm/css/xterm.css';
import './app.css';
import { createRoot } from 'react-dom/client';
import { App } from './App.jsx';

createRoot(document.getElementById('root')).render(<App />);
