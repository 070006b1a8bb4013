@echo off
rem Survival Kit: start the offline assistant on this Windows computer.
rem Double-click it, or in a Command Prompt:
rem   START-windows.bat                  open the chat
rem   START-windows.bat ask "question"   any arguments go to the kit itself (try --help)
rem Finds the runtime for this computer (KIT\runtimes\windows-<arch>\kit.exe) beside this file,
rem explains what to do when it is missing, then runs it. Keep CRLF line endings (cmd.exe needs them).
setlocal EnableExtensions DisableDelayedExpansion

rem The stick: the folder holding this file (any name: spaces, accents), without a trailing backslash.
set "STICK=%~dp0"
if "%STICK:~-1%"=="\" set "STICK=%STICK:~0,-1%"

rem PROCESSOR_ARCHITEW6432 holds the real CPU when a 32-bit cmd.exe runs on 64-bit Windows.
set "ARCH=%PROCESSOR_ARCHITECTURE%"
if defined PROCESSOR_ARCHITEW6432 set "ARCH=%PROCESSOR_ARCHITEW6432%"
if /i "%ARCH%"=="AMD64" set "ARCH=x86_64"
if /i "%ARCH%"=="ARM64" set "ARCH=arm64"
if /i "%ARCH%"=="x86" set "ARCH=x86"

if exist "%STICK%\KIT\INCOMPLETE" (
  echo kit: this stick is incomplete: its build did not finish. Run the same "kit build" again.
  goto :fail
)

set "PLATFORM=windows-%ARCH%"
set "RUNTIME=%STICK%\KIT\runtimes\%PLATFORM%\kit.exe"
if exist "%RUNTIME%" goto :run

rem Windows on Arm runs x86_64 programs through its emulator: slower, but it works.
if /i "%ARCH%"=="arm64" if exist "%STICK%\KIT\runtimes\windows-x86_64\kit.exe" (
  echo kit: this stick has no runtime for windows-arm64; using windows-x86_64 through emulation, slower.
  set "RUNTIME=%STICK%\KIT\runtimes\windows-x86_64\kit.exe"
  goto :run
)

set "HAVE="
for /d %%D in ("%STICK%\KIT\runtimes\*") do call :add_present "%%~nxD"
if not defined HAVE set "HAVE=none"
echo kit: this stick has no runtime for %PLATFORM%; it has: %HAVE%
goto :fail

:run
rem The runtime finds its stick from its own path too; this also holds when that cannot be told.
set "KIT_BUNDLE=%STICK%"
set "KIT_LAUNCHER=%~nx0"
"%RUNTIME%" %*
set "STATUS=%ERRORLEVEL%"
if not "%STATUS%"=="0" call :pause_if_double_clicked
endlocal & exit /b %STATUS%

:fail
call :pause_if_double_clicked
endlocal & exit /b 1

rem Appends %1 to HAVE, comma-separated.
:add_present
if defined HAVE (set "HAVE=%HAVE%, %~1") else (set "HAVE=%~1")
exit /b 0

rem Started by a double-click, the window would close before the message can be read.
:pause_if_double_clicked
echo %CMDCMDLINE% | find /i "%~nx0" >nul 2>&1 && pause
exit /b 0
