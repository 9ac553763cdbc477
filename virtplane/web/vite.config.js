// Plain Vite (no @vitejs/plugin-react: it does not install where npm is 10); esbuild compiles the JSX.
import { defineConfig } from 'vite';

export default defineConfig({
  base: '/console/',
  esbuild: { jsx: 'automatic', jsxImportSource: 'react' },
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    target: 'es2022', // noVNC uses top-level await
    chunkSizeWarningLimit: 4096,
    reportCompressedSize: false,
  },
});
