# `cmake --build BUILD --target uninstall`: removes every file the last `cmake --install BUILD`
# put in place, as BUILD/install_manifest.txt lists them, then keyx's own documentation
# directories once they are empty. The manifest holds the paths without DESTDIR: an install made
# with DESTDIR is removed with the same DESTDIR in the environment. Run it with the rights the
# install had (root for /usr).
if(NOT MANIFEST OR NOT EXISTS "${MANIFEST}")
    message(FATAL_ERROR "${MANIFEST} not found: nothing was installed from this build directory")
endif()
file(STRINGS "${MANIFEST}" installed)
set(dirs "")
foreach(f IN LISTS installed)
    set(f "$ENV{DESTDIR}${f}")
    if(IS_SYMLINK "${f}" OR EXISTS "${f}")
        message(STATUS "Removing ${f}")
        file(REMOVE "${f}")
        if(EXISTS "${f}")
            message(FATAL_ERROR "could not remove ${f}")
        endif()
    else()
        message(STATUS "Already gone: ${f}")
    endif()
    # share/doc/keyx and its docs/ and examples/ belong to keyx alone.
    get_filename_component(dir "${f}" DIRECTORY)
    while(dir MATCHES "/doc/keyx(/|$)")
        list(APPEND dirs "${dir}")
        get_filename_component(dir "${dir}" DIRECTORY)
    endwhile()
endforeach()
list(REMOVE_DUPLICATES dirs)
# Deepest first, so that a directory is empty when its turn comes.
list(SORT dirs ORDER DESCENDING)
foreach(dir IN LISTS dirs)
    file(GLOB left "${dir}/*")
    if(IS_DIRECTORY "${dir}" AND NOT left)
        message(STATUS "Removing ${dir}/")
        file(REMOVE_RECURSE "${dir}")
    endif()
endforeach()
